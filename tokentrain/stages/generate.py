"""`stage: generate`: sample `num_samples` chains per question, grade them, select `pos_sft`, `neg_sft` and `pairs`
(spec critical_dpo section 4).

Questions are sampled in chunks of `chunk_questions`, each saved as its own file when complete: a killed run resumes
at the first missing chunk, so no question is sampled twice. Each chunk has its own seed (`seed`, chunk index), so a
resumed or multi-process run gives the same samples as an uninterrupted one. `samples_from: gsm8k_solutions` reads
real chains instead of sampling.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import distributed_state, progress
from .base import ConfigError, ModelKeys, RowsStage, Stage, StageContext, load_stage_rows, require, stage_output

logger = logging.getLogger(__name__)


@dataclass
class Config(RowsStage, ModelKeys):
    model: str = field(default="", metadata={"help": "Model that samples (hub name, folder or adapter folder)."})
    task: str = field(default="gsm8k", metadata={"help": "Grader of the samples: gsm8k, math or arithmetic."})
    gold_column: str = field(default="answer", metadata={"help": "Column holding the gold answer."})
    question_column: str = field(
        default="question", metadata={"help": "Column stored as `question` (the prompt when the rows have none)."}
    )
    fewshot: str = field(
        default="none", metadata={"help": "Few-shot block before each prompt while sampling: gsm8k, math or none."}
    )
    num_samples: int = field(default=64, metadata={"help": "Samples per question."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass (1.0 = off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    max_new_tokens: int = field(default=1024, metadata={"help": "Tokens sampled at most per completion."})
    batch_size: int = field(default=64, metadata={"help": "Sequences per generate call (questions x samples)."})
    chunk_questions: int = field(
        default=32, metadata={"help": "Questions per saved chunk: a killed run resumes at the first missing chunk."}
    )
    completion_prefix: str = field(
        default=" ", metadata={"help": "Put before each chain in the SFT/pair rows (' ' after 'Answer:')."}
    )
    samples_from: str = field(
        default="", metadata={"help": "'gsm8k_solutions': read real samples instead of generating (no model)."}
    )
    samples_path: str = field(
        default="{data_dir}/gsm8k/example_model_solutions.jsonl.gz",
        metadata={"help": "File of samples_from: gsm8k_solutions."},
    )
    samples_split: str = field(
        default="train", metadata={"help": "samples_from rows: train (index % 4 != 3), heldout or all."}
    )


def run(stage: Stage, ctx: StageContext) -> None:
    from ..tasks.grading import TASKS

    cfg = stage.config
    if cfg.task not in TASKS:
        raise ConfigError(f"{stage.name}: task must be one of {sorted(TASKS)}, got {cfg.task!r}")
    if cfg.samples_from:
        return _samples_from(stage, ctx)
    require(stage, "model", "dataset", why="(or samples_from)")
    if cfg.num_samples < 1 or cfg.chunk_questions < 1 or cfg.batch_size < 1:
        raise ConfigError(f"{stage.name}: num_samples, chunk_questions and batch_size must be >= 1")
    if cfg.temperature <= 0:
        raise ConfigError(f"{stage.name}: temperature must be > 0 for sampling, got {cfg.temperature}")
    check_fewshot(stage)
    questions = _questions(cfg, stage.name)
    n_chunks = -(-len(questions) // cfg.chunk_questions)
    state = distributed_state()
    with stage_output(stage, ctx, keep_partial=True) as tmp:
        chunk_dir = tmp / "chunks"
        if state.is_main_process:
            chunk_dir.mkdir(exist_ok=True)
        state.wait_for_everyone()
        todo = [c for c in range(n_chunks) if not (chunk_dir / f"chunk-{c:06d}.jsonl").exists()]
        if len(todo) < n_chunks:
            logger.info("%s: resuming, %d of %d chunks already sampled", stage.name, n_chunks - len(todo), n_chunks)
        mine = todo[state.process_index :: state.num_processes]
        if mine:
            _sample_chunks(cfg, questions, mine, chunk_dir, state)
        state.wait_for_everyone()
        if state.is_main_process:
            samples = []
            for c in range(n_chunks):
                with open(chunk_dir / f"chunk-{c:06d}.jsonl") as f:
                    samples += [json.loads(line) for line in f]
            write_samples(tmp, samples, cfg, stage.name)
            shutil.rmtree(chunk_dir)


def check_fewshot(stage: Stage) -> None:
    from ..tasks.fewshot import FEWSHOT

    if stage.config.fewshot not in (*FEWSHOT, "none"):
        raise ConfigError(f"{stage.name}: fewshot must be one of {[*FEWSHOT, 'none']}, got {stage.config.fewshot!r}")


def _questions(cfg, name: str) -> list[dict]:
    """Rows -> {question_id, question, gold (canonical), prompt}; a gold answer that does not parse names its row."""
    from ..tasks.grading import gold_answers

    rows = load_stage_rows(cfg)
    ids = rows["question_id"] if "question_id" in rows.column_names else list(range(len(rows)))
    seen = set()
    for i, qid in enumerate(ids):
        if qid in seen:
            raise ValueError(f"{cfg.dataset}: question_id {qid!r} appears twice (row {i})")
        seen.add(qid)
    golds = gold_answers(rows, cfg.task, cfg.gold_column, cfg.dataset, lambda i: f"row {i} (question_id {ids[i]!r})")
    questions = rows[cfg.question_column] if cfg.question_column in rows.column_names else rows["prompt"]
    return [
        {"question_id": qid, "question": question, "gold": gold, "prompt": prompt}
        for qid, question, gold, prompt in zip(ids, questions, golds, rows["prompt"])
    ]


def _sample_chunks(cfg, questions: list[dict], chunks: list[int], chunk_dir: Path, state) -> None:
    import torch

    from ..data import prompt_ids
    from ..models import generate, load_model, load_tokenizer
    from ..tasks.fewshot import cut_at_stop, fewshot_prompt, stop_strings
    from ..tasks.grading import TASKS

    task = TASKS[cfg.task]
    tokenizer = load_tokenizer(cfg.model, revision=cfg.model_revision, trust_remote_code=cfg.trust_remote_code)
    model = load_model(cfg.model, merge_adapter=True, trainable=False, **cfg.model_kwargs(trainable=False))
    model = model.to(state.device)
    per_chunk = cfg.chunk_questions * cfg.num_samples
    logger.info(
        "sampling %d questions x %d (temperature %g, top_p %g, top_k %d, <= %d new tokens) in %d chunks on %d "
        "process(es)",
        len(questions),
        cfg.num_samples,
        cfg.temperature,
        cfg.top_p,
        cfg.top_k,
        cfg.max_new_tokens,
        len(chunks) * state.num_processes,
        state.num_processes,
    )
    for c in progress(chunks, desc=f"Sampling ({per_chunk} sequences per chunk)", enabled=state.is_main_process):
        qs = questions[c * cfg.chunk_questions : (c + 1) * cfg.chunk_questions]
        prompts = [prompt_ids({"prompt": fewshot_prompt(cfg.fewshot, q["prompt"])}, tokenizer) for q in qs]
        torch.manual_seed(cfg.seed * 1_000_003 + c)  # per chunk: the same samples however the run is split
        texts = generate(
            model,
            tokenizer,
            [p for p in prompts for _ in range(cfg.num_samples)],
            cfg.max_new_tokens,
            cfg.batch_size,
            do_sample=True,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            progress=False,
            stop_strings=stop_strings(cfg.task),
        )
        part = chunk_dir / f"chunk-{c:06d}.jsonl.part"
        with open(part, "w") as f:
            for k, q in enumerate(qs):
                chains = [cut_at_stop(t) for t in texts[k * cfg.num_samples : (k + 1) * cfg.num_samples]]
                answers = [task.extract_answer(t) for t in chains]
                correct = [task.grade(t, q["gold"]) == "correct" for t in chains]
                f.write(json.dumps({**q, "completions": chains, "answers": answers, "correct": correct}) + "\n")
        os.replace(part, chunk_dir / f"chunk-{c:06d}.jsonl")  # a chunk exists whole or not at all


def _samples_from(stage: Stage, ctx: StageContext) -> None:
    from ..tasks.selection import samples_from_gsm8k_solutions

    cfg = stage.config
    if cfg.samples_from != "gsm8k_solutions":
        raise ConfigError(f"{stage.name}: samples_from must be 'gsm8k_solutions' or empty, got {cfg.samples_from!r}")
    if cfg.task != "gsm8k":
        raise ConfigError(f"{stage.name}: samples_from gsm8k_solutions needs task gsm8k, got {cfg.task!r}")
    if cfg.samples_split not in ("train", "heldout", "all"):
        raise ConfigError(f"{stage.name}: samples_split must be 'train', 'heldout' or 'all', got {cfg.samples_split!r}")
    samples = samples_from_gsm8k_solutions(cfg.samples_path, cfg.samples_split)
    with stage_output(stage, ctx) as tmp:
        if distributed_state().is_main_process:
            write_samples(tmp, samples, cfg, stage.name)


def write_samples(tmp: Path, samples: list[dict], cfg, name: str) -> None:
    """samples.jsonl, the selected pos_sft/neg_sft/pairs.jsonl and generate_summary.json; prints the counts."""
    from ..tasks.selection import build_sets, question_hash

    sets = build_sets(samples, completion_prefix=cfg.completion_prefix)
    for fname, rows in (("samples", samples), *sets.items()):
        with open(tmp / f"{fname}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    n = max(len(samples), 1)
    total = sum(len(r["completions"]) for r in samples)
    distinct = [len({a for a, ok in zip(r["answers"], r["correct"]) if a and not ok}) for r in samples]
    summary = {
        "stage": name,
        "samples_from": cfg.samples_from or None,
        "samples_split": cfg.samples_split if cfg.samples_from else None,
        "model": None if cfg.samples_from else cfg.model,
        "temperature": None if cfg.samples_from else cfg.temperature,
        "questions": len(samples),
        "samples": total,
        "mean_wrong_per_question": sum(r["correct"].count(False) for r in samples) / n,
        "mean_correct_per_question": sum(r["correct"].count(True) for r in samples) / n,
        "unparsable_fraction": sum(a == "" for r in samples for a in r["answers"]) / max(total, 1),
        # the official code's count: distinct wrong (non-empty) answers, over the questions that have any
        "distinct_wrong_answers_per_erring_question": sum(distinct) / max(sum(d > 0 for d in distinct), 1),
        "question_ids": [r["question_id"] for r in samples],
        "question_hashes": sorted({question_hash(r["question"]) for r in samples}),
        **{f"{k}_rows": len(v) for k, v in sets.items()},
    }
    (tmp / "generate_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info(
        "%s: %d questions, %d samples; per question %.2f correct, %.2f wrong (%.1f%% of samples unparsable; %.2f "
        "distinct wrong answers per question that has one); %d pos_sft, %d neg_sft rows, %d pairs",
        name,
        len(samples),
        total,
        summary["mean_correct_per_question"],
        summary["mean_wrong_per_question"],
        100 * summary["unparsable_fraction"],
        summary["distinct_wrong_answers_per_erring_question"],
        len(sets["pos_sft"]),
        len(sets["neg_sft"]),
        len(sets["pairs"]),
    )
