"""`tokentrain run|train|sft|score|evaluate|prepare|inspect|quickstart`: recipes of numbered stages, and each stage.

    tokentrain run recipes/weighted_ntp_e2e/ [--run_dir runs/e2e] [--overwrite] [--key value ...]
    tokentrain train recipes/weighted_ntp_column/01_train.yaml --max_steps 10
    tokentrain score --model runs/x/ref --dataset rows.jsonl --output_dir runs/x/scored
    tokentrain inspect runs/x/scored --column ref_logps --out heat.html
    tokentrain quickstart weighted_ntp

Every stage writes to `<output_dir>.tmp/` and renames it when complete; `run` skips finished stages, so a killed run
resumes at the first unfinished one (a training stage resumes from its last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from .config import (
    STAGES,
    ConfigError,
    Stage,
    default_data_dir,
    load_stage,
    parse_override_args,
    recipe_stages,
    recipe_variables,
)
from .data import (
    apply_templates,
    load_rows,
    prompt_ids,
    read_meta,
    write_meta,
)
from .models import build_tiny, check_same_vocab, generate, load_model, load_tokenizer, vocab_size
from .objectives import OBJECTIVES, objective
from .runtime import distributed_state, exit_process
from .stages.base import DONE_FILE, atomic_output, is_complete

logger = logging.getLogger("tokentrain")


# -------------------------------------------------------------------------------------------------------- stages


def run_prepare(stage: Stage, overwrite: bool = False) -> None:
    """Make the data of a task (split or generate it) and the tiny base model with its tokenizer trained in code."""
    from .tasks import e2e

    cfg = stage.config
    if cfg.task == "arith_chain":
        return _prepare_arith_chain(stage, overwrite)
    if cfg.task == "e2e":
        data_dir = Path(cfg.data_dir) / "e2e"
        if not data_dir.exists():
            raise FileNotFoundError(f"E2E data not found at {data_dir}: set --data_dir or $TOKENTRAIN_DATA")
        train, test = e2e.split_e2e(e2e.load_e2e(data_dir))
    elif cfg.task == "e2e_synthetic":
        rows = e2e.make_synthetic_e2e(cfg.num_rows, cfg.seed)
        train, test = e2e.split_e2e(rows, num_test=max(10, len({r["mr"] for r in rows}) // 10))
    else:
        raise ConfigError(f"{stage.path.name}: task must be 'e2e', 'e2e_synthetic' or 'arith_chain', got {cfg.task!r}")

    def fmt(rows):
        return [{**e2e.format_row(r["mr"], r["ref"]), "mr": r["mr"]} for r in rows]

    with atomic_output(cfg.output_dir, overwrite=overwrite) as tmp:
        clean = [r for r in train if e2e.is_clean(r["mr"], r["ref"])]
        for name, rows in (("train", fmt(train)), ("test", fmt(test)), ("clean", fmt(clean))):
            with open(tmp / f"{name}.jsonl", "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        texts = [r["mr"] for r in train] + [r["ref"] for r in train]
        build_tiny(tmp / "init", texts, vocab_size=cfg.vocab_size, seed=cfg.seed)
        logger.info(
            "prepared %s: %d train rows (%d clean), %d test rows (%d MRs), tiny model in init/",
            cfg.task,
            len(train),
            len(clean),
            len(test),
            len({r["mr"] for r in test}),
        )


def _prepare_arith_chain(stage: Stage, overwrite: bool) -> None:
    """arith_chain (spec critical_dpo section 7): one jsonl of problems per entry of `splits` ({name: [rows, seed]}),
    the character tokenizer and the 264,000-parameter Llama (hidden 64, 4 layers, 4 heads, MLP 256) in init/."""
    from .models import char_tokenizer, tiny_llama
    from .tasks.arithmetic import ALPHABET, make_problems

    cfg = stage.config
    if not cfg.splits:
        raise ConfigError(f"{stage.path.name}: arith_chain needs `splits`, e.g. {{pool: [50000, 0], dev: [200, 777]}}")
    with atomic_output(cfg.output_dir, overwrite=overwrite) as tmp:
        for name, spec in cfg.splits.items():
            if not (isinstance(spec, list) and len(spec) == 2 and all(isinstance(x, int) for x in spec)):
                raise ConfigError(f"{stage.path.name}: splits.{name} must be [rows, seed], got {spec!r}")
            with open(tmp / f"{name}.jsonl", "w") as f:
                for i, row in enumerate(make_problems(*spec)):
                    f.write(json.dumps({"question_id": i, **row}) + "\n")
            logger.info("arith_chain %s: %d problems (seed %d)", name, *spec)
        tokenizer = char_tokenizer(ALPHABET)
        model = tiny_llama(
            tokenizer,
            hidden_size=64,
            num_layers=4,
            num_heads=4,
            intermediate_size=256,
            max_positions=128,
            seed=cfg.seed,
        )
        model.save_pretrained(tmp / "init")
        tokenizer.save_pretrained(tmp / "init")
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("arith_chain model: %d parameters, vocab %d -> %s/init", n_params, len(tokenizer), cfg.output_dir)


def _drop_prompt_rows(dataset, tokenizer):
    """[s] + completion ids with labels on the completion: the text-only reference's training view."""
    from .signals.ref_logps import reference_view

    def view(example, idx):
        v = reference_view(example, tokenizer, True, idx)
        return {"input_ids": v["input_ids"], "labels": v["labels"]}

    return dataset.map(view, with_indices=True, remove_columns=dataset.column_names, desc="drop_prompt view")


def _load_rows(cfg):
    rows = load_rows(cfg.dataset, cfg.dataset_split, cfg.dataset_config or None)
    return apply_templates(rows, cfg.prompt_template, cfg.completion_template)


def run_train(stage: Stage, overwrite: bool = False) -> None:
    """`sft` (TRL SFTTrainer, the baseline) or `train` (an objective's trainer); resumes from the last checkpoint."""
    from peft import LoraConfig
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig, SFTTrainer

    cfg = stage.config
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    dataset = _load_rows(cfg)
    is_train = cfg.stage == "train"
    if is_train:
        config_cls, trainer_cls = objective(cfg.objective)
        meta = read_meta(cfg.dataset)
        if meta:
            _check_signal_meta(meta, tokenizer, stage)
    else:
        config_cls, trainer_cls = SFTConfig, SFTTrainer
        if cfg.drop_prompt:
            dataset = _drop_prompt_rows(dataset, tokenizer)
    peft_config = None
    if cfg.lora_r > 0:
        targets = cfg.lora_target_modules
        peft_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
            task_type="CAUSAL_LM",
        )
    eval_dataset = None
    if cfg.eval_holdout:
        if not 0 < cfg.eval_holdout < len(dataset):
            raise ConfigError(
                f"{stage.path.name}: eval_holdout {cfg.eval_holdout} must be between 1 and the {len(dataset)} rows - 1"
            )
        n = len(dataset) - cfg.eval_holdout
        dataset, eval_dataset = dataset.select(range(n)), dataset.select(range(n, len(dataset)))
        logger.info("%s: %d training rows, the last %d held out for evaluation", stage.name, n, cfg.eval_holdout)
    stoppers = [AccuracyStop(cfg, tokenizer)] if cfg.stop_accuracy > 0 else []
    with atomic_output(cfg.output_dir, overwrite=overwrite, keep_partial=True) as tmp:
        kwargs = {"report_to": "none", "logging_steps": 10, **stage.trainer_kwargs}
        args = config_cls(output_dir=str(tmp), seed=cfg.seed, **kwargs)
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=stoppers,
        )
        last = get_last_checkpoint(str(tmp)) if tmp.exists() else None
        if last:
            logger.info("%s: resuming from %s", stage.name, last)
        start = time.time()
        result = trainer.train(resume_from_checkpoint=last)
        trainer.save_model(str(tmp))
        if distributed_state().is_main_process:
            tokenizer.save_pretrained(str(tmp))
            for ckpt in tmp.glob("checkpoint-*"):
                shutil.rmtree(ckpt)
            summary = {"train_seconds": round(time.time() - start, 1), **result.metrics, "stage": stage.name}
            summary["log_history"] = trainer.state.log_history
            if trainer.state.best_metric is not None:  # load_best_model_at_end: the saved model is this checkpoint's
                summary["best_metric"] = trainer.state.best_metric
                summary["best_step"] = int(Path(trainer.state.best_model_checkpoint).name.split("-")[-1])
            if stoppers:
                summary["accuracy_checks"] = stoppers[0].checks
            (tmp / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def run_generate(stage: Stage, overwrite: bool = False) -> None:
    """Sample `num_samples` chains per question, grade them, select `pos_sft`, `neg_sft` and `pairs` (spec critical_dpo
    section 4). Questions are sampled in chunks of `chunk_questions`, each saved as its own file when complete: a
    killed run resumes at the first missing chunk, so no question is sampled twice. Each chunk has its own seed
    (`seed`, chunk index), so a resumed or multi-process run gives the same samples as an uninterrupted one."""
    from .tasks.grading import TASKS

    cfg = stage.config
    if cfg.task not in TASKS:
        raise ConfigError(f"{stage.path.name}: task must be one of {sorted(TASKS)}, got {cfg.task!r}")
    if cfg.samples_from:
        return _samples_from(stage, overwrite)
    for key in ("model", "dataset"):
        if not getattr(cfg, key):
            raise ConfigError(f"{stage.path.name}: generate needs {key} (or samples_from)")
    if cfg.num_samples < 1 or cfg.chunk_questions < 1 or cfg.batch_size < 1:
        raise ConfigError(f"{stage.path.name}: num_samples, chunk_questions and batch_size must be >= 1")
    if cfg.temperature <= 0:
        raise ConfigError(f"{stage.path.name}: temperature must be > 0 for sampling, got {cfg.temperature}")
    _check_fewshot(stage)
    questions = _questions(cfg, TASKS[cfg.task])
    n_chunks = -(-len(questions) // cfg.chunk_questions)
    state = distributed_state()
    with atomic_output(cfg.output_dir, overwrite=overwrite, keep_partial=True) as tmp:
        chunk_dir = tmp / "chunks"
        if state.is_main_process:
            chunk_dir.mkdir(exist_ok=True)
            _check_chunk_settings(chunk_dir, _sampling_settings(cfg, questions), stage.name)
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
            (chunk_dir / "settings.json").unlink()
            for c in range(n_chunks):
                with open(chunk_dir / f"chunk-{c:06d}.jsonl") as f:
                    samples += [json.loads(line) for line in f]
            _write_samples(tmp, samples, cfg, stage.name)
            shutil.rmtree(chunk_dir)


def _sampling_settings(cfg, questions: list[dict]) -> dict:
    """What decides the samples of a chunk: a resumed run must have the same, or its chunks would mix two runs."""
    import hashlib

    ids = hashlib.sha256(json.dumps([[q["question_id"], q["prompt"]] for q in questions]).encode()).hexdigest()
    keys = ("model", "dataset", "dataset_split", "fewshot", "num_samples", "temperature", "top_p", "top_k")
    keys += ("max_new_tokens", "chunk_questions", "seed")
    return {**{k: getattr(cfg, k) for k in keys}, "questions_sha256": ids}


def _check_chunk_settings(chunk_dir: Path, settings: dict, name: str) -> None:
    path = chunk_dir / "settings.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise ConfigError(
                f"{name}: {chunk_dir} holds chunks sampled with other settings ({changed}, as (then, now)); resuming "
                "would mix two runs: pass --overwrite to start again, or restore the settings"
            )
    else:
        path.write_text(json.dumps(settings, indent=2) + "\n")


def _questions(cfg, task) -> list[dict]:
    """Rows -> {question_id, question, gold (canonical), prompt}; a gold answer that does not parse names its row."""
    rows = _load_rows(cfg)
    ids = rows["question_id"] if "question_id" in rows.column_names else list(range(len(rows)))
    seen = set()
    for i, qid in enumerate(ids):
        if qid in seen:
            raise ValueError(f"{cfg.dataset}: question_id {qid!r} appears twice (row {i})")
        seen.add(qid)
    golds = _golds(cfg, rows, lambda i: f"row {i} (question_id {ids[i]!r})")
    questions = rows[cfg.question_column] if cfg.question_column in rows.column_names else rows["prompt"]
    return [
        {"question_id": qid, "question": question, "gold": gold, "prompt": prompt}
        for qid, question, gold, prompt in zip(ids, questions, golds, rows["prompt"])
    ]


def _golds(cfg, rows, label) -> list[str]:
    """The canonical gold answer of every row (`cfg.task`'s parser); a missing `prompt` or gold column, or a gold that
    does not parse, is an error naming the row (`label(i)`), raised before any model is loaded."""
    from .tasks.grading import TASKS

    missing = [c for c in ("prompt", cfg.gold_column) if c not in rows.column_names]
    if missing:
        raise KeyError(
            f"{cfg.dataset}: rows need column(s) {missing} (have {rows.column_names}); build `prompt` with "
            "prompt_template, name the gold column with gold_column"
        )
    golds = []
    for i, gold in enumerate(rows[cfg.gold_column]):
        try:
            golds.append(TASKS[cfg.task].gold_answer(str(gold)))
        except ValueError as e:
            raise ValueError(f"{cfg.dataset}: {label(i)}: {e}") from None
    return golds


def _sample_chunks(cfg, questions: list[dict], chunks: list[int], chunk_dir: Path, state) -> None:
    import torch
    from tqdm.auto import tqdm

    from .tasks.fewshot import cut_at_stop, fewshot_prompt, stop_strings
    from .tasks.grading import TASKS

    task = TASKS[cfg.task]
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, dtype=cfg.dtype, merge_adapter=True, trainable=False).to(state.device)
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
    for c in tqdm(chunks, desc=f"Sampling ({per_chunk} sequences per chunk)", disable=not state.is_main_process):
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


def _samples_from(stage: Stage, overwrite: bool) -> None:
    from .tasks.selection import samples_from_gsm8k_solutions

    cfg = stage.config
    if cfg.samples_from != "gsm8k_solutions":
        raise ConfigError(
            f"{stage.path.name}: samples_from must be 'gsm8k_solutions' or empty, got {cfg.samples_from!r}"
        )
    if cfg.task != "gsm8k":
        raise ConfigError(f"{stage.path.name}: samples_from gsm8k_solutions needs task gsm8k, got {cfg.task!r}")
    if cfg.samples_split not in ("train", "heldout", "all"):
        raise ConfigError(
            f"{stage.path.name}: samples_split must be 'train', 'heldout' or 'all', got {cfg.samples_split!r}"
        )
    samples = samples_from_gsm8k_solutions(cfg.samples_path, cfg.samples_split)
    with atomic_output(cfg.output_dir, overwrite=overwrite) as tmp:
        if distributed_state().is_main_process:
            _write_samples(tmp, samples, cfg, stage.name)


def _write_samples(tmp: Path, samples: list[dict], cfg, name: str) -> None:
    """samples.jsonl, the selected pos_sft/neg_sft/pairs.jsonl and generate_summary.json; prints the counts."""
    from .tasks.selection import build_sets

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
        "question_hashes": sorted({_question_hash(r["question"]) for r in samples}),
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


class AccuracyStop(TrainerCallback):
    """Greedy accuracy of the model on `stop_dataset` every `stop_check_every` steps from `stop_check_from`; training
    stops at the first check reaching `stop_accuracy` (the mini experiment's base SFT: stop at dev >= 0.45)."""

    def __init__(self, cfg, tokenizer):
        from .tasks.grading import GRADERS

        if cfg.stop_task not in GRADERS or not cfg.stop_dataset:
            raise ConfigError(f"stop_accuracy needs stop_dataset and stop_task (one of {sorted(GRADERS)})")
        self.cfg, self.tokenizer, self.grade = cfg, tokenizer, GRADERS[cfg.stop_task]
        self.rows = list(load_rows(cfg.stop_dataset))
        self.prompts = [prompt_ids(r, tokenizer) for r in self.rows]
        self.checks: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from .tasks.grading import accuracy

        step, cfg = state.global_step, self.cfg
        if step < cfg.stop_check_from or (step - cfg.stop_check_from) % cfg.stop_check_every:
            return control
        was_training = model.training
        texts = generate(model, self.tokenizer, self.prompts, cfg.stop_max_new_tokens, 256, progress=False)
        model.train(was_training)
        acc = accuracy(self.grade(t, str(r["gold"])) for t, r in zip(texts, self.rows))["accuracy"]
        self.checks.append({"step": step, "accuracy": acc})
        logger.info(
            "step %d: greedy accuracy on %s %.3f (stop at %.3f)", step, cfg.stop_dataset, acc, cfg.stop_accuracy
        )
        if acc >= cfg.stop_accuracy:
            control.should_training_stop = True
        return control


def _check_signal_meta(meta: dict, tokenizer, stage: Stage) -> None:
    if meta.get("vocab_size") is not None and meta["vocab_size"] != len(tokenizer):
        raise ValueError(
            f"{stage.path.name}: signals were scored for a vocabulary of {meta['vocab_size']} tokens but the policy "
            f"tokenizer has {len(tokenizer)}: they belong to another tokenizer"
        )
    if stage.trainer_kwargs.get("weighting") == "prior" and meta.get("drop_prompt") is False:
        logger.warning(
            "%s: weighting 'prior' on ref_logps scored with drop_prompt false: the reference saw the context, so its "
            "weights no longer single out context-related tokens",
            stage.name,
        )


def run_score(stage: Stage, overwrite: bool = False) -> None:
    """Frozen reference -> `completion_ids` + `ref_logps` columns, written beside the input columns."""
    from accelerate import Accelerator

    from .signals.ref_logps import score_ref_logps

    cfg = stage.config
    if cfg.signal == "contrastive":
        return _score_contrastive(stage, overwrite)
    if cfg.signal != "ref_logps":
        raise ConfigError(f"{stage.path.name}: signal must be 'ref_logps' or 'contrastive', got {cfg.signal!r}")
    accelerator = Accelerator()
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    reference = load_model(cfg.model, dtype=cfg.dtype, trainable=False).to(accelerator.device)
    check_same_vocab(tokenizer, reference, f"reference model {cfg.model}")
    dataset = _load_rows(cfg)
    with atomic_output(cfg.output_dir, overwrite=overwrite) as tmp:
        ids, logps = score_ref_logps(
            dataset, reference, tokenizer, cfg.drop_prompt, cfg.batch_size, accelerator=accelerator
        )
        if accelerator.is_main_process:
            for col in ("completion_ids", "ref_logps"):
                if col in dataset.column_names:
                    dataset = dataset.remove_columns(col)
            dataset = dataset.add_column("completion_ids", ids).add_column("ref_logps", logps)
            dataset.save_to_disk(str(tmp))
            write_meta(
                tmp,
                {
                    "signal": "ref_logps",
                    "reference": cfg.model,
                    "drop_prompt": cfg.drop_prompt,
                    "tokenizer": tokenizer.name_or_path,
                    "vocab_size": len(tokenizer),
                    "reference_vocab_size": vocab_size(reference),
                    "rows": len(dataset),
                },
            )
            logger.info("scored %d rows (%d tokens) -> %s", len(ids), sum(map(len, ids)), cfg.output_dir)


def _score_contrastive(stage: Stage, overwrite: bool) -> None:
    """pos/neg models -> `prompt_ids`, `chosen_ids`, `rejected_ids`, `rejected_weights` [, `chosen_weights`] columns
    (spec critical_dpo section 2); rows the length filter drops are left out, the others keep their columns."""
    from accelerate import Accelerator

    from .signals.contrastive import score_contrastive

    cfg = stage.config
    for key in ("pos_model", "neg_model", "dataset"):
        if not getattr(cfg, key):
            raise ConfigError(f"{stage.path.name}: signal 'contrastive' needs {key}")
    if Path(cfg.pos_model).resolve() == Path(cfg.neg_model).resolve() or cfg.pos_model == cfg.neg_model:
        raise ConfigError(
            f"{stage.path.name}: pos_model and neg_model are both {cfg.pos_model!r}; the contrastive estimate needs the "
            "positive and the negative fine-tunes"
        )
    accelerator = Accelerator()
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.pos_model)
    models = {}
    for side in ("pos_model", "neg_model"):
        path = getattr(cfg, side)
        model = load_model(path, dtype=cfg.dtype, merge_adapter=True, trainable=False).to(accelerator.device)
        own = load_tokenizer(path) if _has_tokenizer(path) else None
        check_same_vocab(tokenizer, model, f"{side} {path}", model_tokenizer=own)
        models[side] = model
    dataset = _load_rows(cfg)
    require = [c for c in ("prompt", "chosen", "rejected") if c not in dataset.column_names]
    if require:
        raise KeyError(
            f"{cfg.dataset}: preference rows need columns prompt, chosen, rejected; missing {require} (a generate "
            "stage writes them to <output_dir>/pairs.jsonl)"
        )
    with atomic_output(cfg.output_dir, overwrite=overwrite) as tmp:
        columns = score_contrastive(
            dataset,
            models["pos_model"],
            models["neg_model"],
            tokenizer,
            ce_beta=cfg.ce_beta,
            score_chosen=cfg.score_chosen,
            batch_size=cfg.batch_size,
            chunk_size=cfg.chunk_size,
            max_prompt_length=cfg.max_prompt_length,
            max_length=cfg.max_length,
            accelerator=accelerator,
        )
        if accelerator.is_main_process:
            from datasets import Sequence, Value

            kept = columns.pop("kept_rows")
            n_rows, dataset = len(dataset), dataset.select(kept)
            for name, values in columns.items():
                if name in dataset.column_names:
                    dataset = dataset.remove_columns(name)
                dtype = "int32" if name.endswith("_ids") else "float32"
                dataset = dataset.add_column(name, values, feature=Sequence(Value(dtype)))
            dataset.save_to_disk(str(tmp))
            weights = [w for row in columns["rejected_weights"] for w in row]
            meta = {
                "signal": "contrastive",
                "pos_model": cfg.pos_model,
                "neg_model": cfg.neg_model,
                "ce_beta": cfg.ce_beta,
                "score_chosen": cfg.score_chosen,
                "tokenizer": tokenizer.name_or_path,
                "vocab_size": len(tokenizer),
                "rows": len(dataset),
                "dropped_rows": n_rows - len(kept),
                "rejected_weight_mean": sum(weights) / max(len(weights), 1),
                "rejected_weight_above_half": sum(w > 0.5 for w in weights) / max(len(weights), 1),
            }
            write_meta(tmp, meta)
            logger.info(
                "scored %d pairs (%d rejected tokens): mean rejected weight %.3f, %.1f%% of tokens above 0.5 -> %s",
                len(dataset),
                len(weights),
                meta["rejected_weight_mean"],
                100 * meta["rejected_weight_above_half"],
                cfg.output_dir,
            )


def _has_tokenizer(path: str) -> bool:
    folder = Path(path)
    return not folder.is_dir() or any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))


def run_evaluate(stage: Stage, overwrite: bool = False) -> dict:
    """Greedy decoding (+ held-out NLL) of each model on the task's rows; writes eval.json and prints a table. With
    several processes, every process decodes its share of the rows and the main process writes the results."""

    from .signals.ref_logps import score_ref_logps
    from .tasks import e2e
    from .tasks.fewshot import cut_at_stop, fewshot_prompt, stop_strings
    from .tasks.grading import GRADERS, accuracy

    cfg = stage.config
    if cfg.task != "e2e" and cfg.task not in GRADERS:
        raise ConfigError(f"{stage.path.name}: task must be 'e2e' or one of {sorted(GRADERS)}, got {cfg.task!r}")
    _check_fewshot(stage)
    rows = _evaluation_rows(stage)
    golds = _golds(cfg, rows, lambda i: f"evaluation row {i}") if cfg.task in GRADERS else None
    state = distributed_state()
    results = {}
    with atomic_output(cfg.output_dir, overwrite=overwrite) as tmp:
        for name, path in cfg.models.items():
            tokenizer = load_tokenizer(path)
            model = load_model(path, dtype=cfg.dtype, merge_adapter=True, trainable=False).to(state.device)
            nll = None
            if cfg.heldout_nll:
                _, logps = score_ref_logps(rows, model, tokenizer, batch_size=cfg.batch_size)  # sharded, gathered
                nll = -sum(map(sum, logps)) / max(sum(map(len, logps)), 1)
            if cfg.task in GRADERS:
                prompts = [prompt_ids({"prompt": fewshot_prompt(cfg.fewshot, r["prompt"])}, tokenizer) for r in rows]
                texts = _generate_sharded(
                    model, tokenizer, prompts, cfg, desc=name, stop_strings=stop_strings(cfg.task)
                )
                texts = [cut_at_stop(t) for t in texts]
                verdicts = [GRADERS[cfg.task](t, gold) for t, gold in zip(texts, golds)]
                results[name] = {**accuracy(verdicts), "heldout_nll": nll}
                logger.info("%s: %s accuracy %.4f", name, cfg.task, results[name]["accuracy"])
                if state.is_main_process:
                    with open(tmp / f"outputs_{Path(str(name)).name}.jsonl", "w") as f:
                        for text, verdict, r in zip(texts, verdicts, rows):
                            f.write(json.dumps({"prompt": r["prompt"], "output": text, "verdict": verdict}) + "\n")
                continue
            # slot accuracy is over the distinct MRs: decode each once (greedy gives one output per prompt)
            unique = list({r["mr"]: r for r in rows}.values())
            prompts = [prompt_ids(r, tokenizer) for r in unique]
            texts = _generate_sharded(model, tokenizer, prompts, cfg, desc=f"Decoding {name}")
            realised, total = e2e.slot_accuracy([r["mr"] for r in unique], texts)
            summary = read_summary(path)
            results[name] = {
                "slot_acc": realised / total,
                "realised": realised,
                "slots": total,
                "heldout_nll": nll,
                "train_seconds": summary.get("train_seconds"),
            }
            logger.info(
                "%s: slot accuracy %.4f (%d/%d), held-out NLL %.4f", name, realised / total, realised, total, nll
            )
            if state.is_main_process:
                with open(tmp / f"outputs_{Path(str(name)).name}.jsonl", "w") as f:
                    for mr, text in zip([r["mr"] for r in unique], texts):
                        f.write(json.dumps({"mr": mr, "output": text}) + "\n")
        if state.is_main_process:
            if cfg.prior_signals:
                results["prior_diagnostic"] = _prior_diagnostic(cfg.prior_signals)
                print(
                    "PRIOR mean weight on value-first / value-rest / other / </s> tokens:", results["prior_diagnostic"]
                )
            (tmp / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
            models = {k: v for k, v in results.items() if k != "prior_diagnostic"}
            print(format_table(models) if cfg.task == "e2e" else format_accuracy_table(models))
    return results


def _generate_sharded(model, tokenizer, prompts, cfg, desc: str, stop_strings=()) -> list[str]:
    """Greedy completions of `prompts`, rows strided over the processes, gathered back in order on every process."""
    state = distributed_state()
    mine = list(range(state.process_index, len(prompts), state.num_processes))
    texts = generate(
        model,
        tokenizer,
        [prompts[i] for i in mine],
        cfg.max_new_tokens,
        cfg.batch_size,
        desc=desc,
        progress=state.is_main_process,
        stop_strings=stop_strings,
    )
    if state.num_processes == 1:
        return texts
    from accelerate.utils import gather_object

    done = dict(gather_object(list(zip(mine, texts))))
    return [done[i] for i in range(len(prompts))]


def _check_fewshot(stage: Stage) -> None:
    from .tasks.fewshot import FEWSHOT

    if stage.config.fewshot not in (*FEWSHOT, "none"):
        raise ConfigError(
            f"{stage.path.name}: fewshot must be one of {[*FEWSHOT, 'none']}, got {stage.config.fewshot!r}"
        )


def _question_hash(text) -> str:
    """A question's identity across files: sha1 of its whitespace-normalised text (chat prompts: their JSON)."""
    import hashlib

    text = text if isinstance(text, str) else json.dumps(text, sort_keys=True)
    return hashlib.sha1(" ".join(text.split()).encode()).hexdigest()


def _evaluation_rows(stage: Stage):
    """The evaluation rows; `rows: heldout` keeps GSM8K test rows with index % 4 == 3. With `train_samples` naming the
    generate output the models trained on, an evaluation row whose question fed training is an error: matched by
    question text, and for `samples_from: gsm8k_solutions` (whose rows are GSM8K test rows) also by index."""
    from .tasks.selection import is_heldout

    cfg = stage.config
    if cfg.rows not in ("all", "heldout"):
        raise ConfigError(f"{stage.path.name}: rows must be 'all' or 'heldout', got {cfg.rows!r}")
    if cfg.rows == "heldout" and "[" in cfg.dataset_split:
        raise ConfigError(
            f"{stage.path.name}: rows: heldout selects GSM8K test rows by index; a sliced split "
            f"({cfg.dataset_split!r}) would shift the indices"
        )
    rows = _load_rows(cfg)
    indices = list(range(len(rows)))
    if cfg.rows == "heldout":
        indices = [i for i in indices if is_heldout(i)]
    if cfg.train_samples:
        _refuse_trained_rows(stage, rows, indices)
    return rows.select(indices) if len(indices) < len(rows) else rows


def _refuse_trained_rows(stage: Stage, rows, indices: list[int]) -> None:
    """Error if an evaluation row's question fed training (`train_samples`' generate_summary.json): by question text,
    and for `samples_from: gsm8k_solutions` (GSM8K test rows) also by index."""
    cfg = stage.config
    summary_path = Path(cfg.train_samples) / "generate_summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{stage.path.name}: train_samples {cfg.train_samples} has no generate_summary.json")
    summary = json.loads(summary_path.read_text())
    leaked = set()
    if summary.get("question_hashes") is not None:
        column = cfg.question_column if cfg.question_column in rows.column_names else "prompt"
        if column not in rows.column_names:
            raise KeyError(f"{stage.path.name}: rows have neither {cfg.question_column!r} nor 'prompt' to match")
        trained, texts = set(summary["question_hashes"]), rows[column]
        leaked |= {i for i in indices if _question_hash(texts[i]) in trained}
    if summary.get("samples_from") == "gsm8k_solutions":
        leaked |= set(indices) & set(summary["question_ids"])
    if leaked:
        raise ConfigError(
            f"{stage.path.name}: {len(leaked)} evaluation rows (first: row {min(leaked)}) are questions that fed "
            f"training ({cfg.train_samples})"
            + ("; evaluate on `rows: heldout` (index % 4 == 3)" if summary.get("samples_from") else "")
        )
    logger.info("%s: none of the %d evaluation rows fed training (%s)", stage.name, len(indices), cfg.train_samples)


def _prior_diagnostic(scored: str) -> dict:
    """Mean PRIOR weight (alpha 1, per-row normalised as in training) on value tokens vs the rest (spec section 7)."""
    import torch

    from .losses.weighted_ntp import prior_weights
    from .tasks.e2e import prior_weight_diagnostic

    rows = load_rows(scored)
    tokenizer = load_tokenizer((read_meta(scored) or {})["tokenizer"])
    weights = []
    for r in rows["ref_logps"]:
        t = torch.tensor([r], dtype=torch.float64)  # (1, k)
        weights.append(prior_weights(t, torch.ones_like(t, dtype=torch.bool), torch.zeros_like(t, dtype=torch.long))[0])
    return prior_weight_diagnostic(list(rows), tokenizer, [w.tolist() for w in weights])


def read_summary(model_dir) -> dict:
    path = Path(str(model_dir)) / "train_summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def format_table(results: dict) -> str:
    """Per-model rows, then `name_s<seed>` models aggregated per method as mean ± sd over seeds."""
    import re
    import statistics

    lines = ["| model | slot acc | held-out NLL | train s |", "|---|---|---|---|"]
    groups: dict[str, list[dict]] = {}
    for name, r in results.items():
        secs = "" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}"
        lines.append(
            f"| {name} | {r['slot_acc']:.4f} ({r['realised']}/{r['slots']}) | {r['heldout_nll']:.4f} | {secs} |"
        )
        groups.setdefault(re.sub(r"_s\d+$", "", name), []).append(r)
    multi = {k: v for k, v in groups.items() if len(v) > 1}
    if multi:
        lines += [
            "",
            "| method | slot acc mean ± sd | held-out NLL mean ± sd | slot acc per seed |",
            "|---|---|---|---|",
        ]
        for method, rs in multi.items():
            acc, nll = [r["slot_acc"] for r in rs], [r["heldout_nll"] for r in rs]
            per_seed = ", ".join(f"{a:.3f}" for a in acc)
            lines.append(
                f"| {method} | {statistics.mean(acc):.3f} ± {statistics.stdev(acc):.3f} | "
                f"{statistics.mean(nll):.3f} ± {statistics.stdev(nll):.3f} | {per_seed} |"
            )
    return "\n".join(lines)


def format_accuracy_table(results: dict) -> str:
    """Graded tasks: per-model accuracy with its correct / wrong / unparsable counts."""
    lines = ["| model | accuracy | correct | wrong | unparsable |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {100 * r['accuracy']:.1f}% | {r['correct']} | {r['wrong']} | {r['unparsable']} |")
    return "\n".join(lines)


def run_stage(stage: Stage, overwrite: bool = False) -> None:
    out = stage.config.output_dir
    if not out:
        raise ConfigError(f"{stage.path}: output_dir is required")
    if is_complete(out) and not overwrite:
        logger.info("stage %s: %s is complete, skipped (--overwrite to redo)", stage.name, out)
        return
    logger.info("stage %s (%s) -> %s", stage.name, stage.config.stage, out)
    RUNNERS[stage.config.stage](stage, overwrite)


def run_recipe(
    recipe: str | Path,
    run_dir: str | None,
    data_dir: str | None,
    overrides: dict,
    overwrite=False,
    variables: dict | None = None,
):
    """Run the numbered stages of `recipe` in order, skipping complete ones. `variables` (from an enclosing grid) are
    substituted like {run_dir}; `top_dir` is the outermost recipe's run_dir."""
    recipe = Path(recipe)
    files = recipe_stages(recipe)
    run_dir = run_dir or str(Path("runs") / (recipe.name if recipe.is_dir() else recipe.parent.name))
    own = recipe_variables(recipe, overrides)
    variables = {
        "top_dir": run_dir,
        **own,
        **(variables or {}),
        "run_dir": run_dir,
        "data_dir": data_dir or default_data_dir(),
    }
    stages = [load_stage(f, overrides, variables, strict=False) for f in files]  # parse all before running any
    known = set().union(*(_recipe_keys(s) for s in stages)) | set(own)
    unused = [k for k in overrides if k not in known]
    if unused:
        raise ConfigError(f"override(s) {unused} match no key of any stage in {recipe}")
    logger.info("recipe %s: %d stages -> %s", recipe, len(stages), variables["run_dir"])
    for stage in stages:
        run_stage(stage, overwrite)
    return variables["run_dir"]


def _recipe_keys(stage: Stage) -> set[str]:
    """Keys a stage accepts; for a grid also every key written in its sub-recipes' stage files (the grid passes the
    command line's overrides on to them)."""
    keys = set(stage.trainer_kwargs) | set(vars(stage.config))
    if stage.config.stage == "grid":
        keys |= _sub_recipe_keys(_grid_recipe(stage))
    return keys


def _sub_recipe_keys(recipe: Path) -> set[str]:
    import yaml

    keys = set()
    for f in recipe_stages(recipe):
        raw = yaml.safe_load(f.read_text()) or {}
        keys |= set(raw)
        if raw.get("stage") == "grid":
            keys |= _sub_recipe_keys(_sub_recipe_path(f, raw.get("recipe", "")))
    return keys


def _grid_recipe(stage: Stage) -> Path:
    return _sub_recipe_path(stage.path, stage.config.recipe)


def _sub_recipe_path(stage_file: Path, recipe: str) -> Path:
    """A grid's `recipe`, relative to the grid's own stage file."""
    if not recipe:
        raise ConfigError(f"{stage_file.name}: a grid stage needs `recipe` (a folder of numbered stage files)")
    sub = Path(recipe)
    return sub if sub.is_absolute() else stage_file.parent / sub


def _combo_name(combo: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in combo.items())


def run_grid(stage: Stage, overwrite: bool = False) -> None:
    """Run the sub-recipe once per combination of `variables` (product, in order), each in `<output_dir>/<name>/`
    (`seed0`, `lr3e-05`, ...), `workers` at a time in their own processes. Every stage inside is atomic and skipped
    when complete, so a killed grid resumes where each combination stopped; the grid is marked complete at the end."""
    import concurrent.futures
    import itertools
    import multiprocessing

    import torch

    cfg = stage.config
    sub = _grid_recipe(stage)
    if not cfg.variables or not all(isinstance(v, list) and v for v in cfg.variables.values()):
        raise ConfigError(f"{stage.path.name}: variables must map names to non-empty lists, got {cfg.variables!r}")
    if cfg.workers < 1:
        raise ConfigError(f"{stage.path.name}: workers must be >= 1, got {cfg.workers}")
    names = list(cfg.variables)
    combos = [dict(zip(names, values)) for values in itertools.product(*cfg.variables.values())]
    out = Path(cfg.output_dir)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for combo in combos:
        variables = {
            **stage.variables,
            **{k: str(v) for k, v in combo.items()},
            "parent_dir": stage.variables["run_dir"],
        }
        variables.pop("run_dir")
        jobs.append((str(sub), str(out / _combo_name(combo)), variables["data_dir"], stage.overrides, variables))
    # a nested grid shares its worker's threads: divide what this process has, not the machine's cores
    threads = cfg.threads or max(1, torch.get_num_threads() // min(cfg.workers, len(jobs)))
    logger.info(
        "grid %s: %d combinations of %s from %s, %d at a time (%d torch threads each)",
        stage.name,
        len(jobs),
        names,
        sub,
        cfg.workers,
        threads,
    )
    failed = []
    if cfg.workers == 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for job in jobs:
                run_recipe(job[0], job[1], job[2], job[3], variables=job[4])
        finally:
            torch.set_num_threads(before)
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(cfg.workers, mp_context=context) as pool:
            futures = {pool.submit(_grid_worker, *job, threads): job[1] for job in jobs}
            for future in concurrent.futures.as_completed(futures):
                try:
                    future.result()
                    logger.info("grid %s: %s finished", stage.name, futures[future])
                except Exception as e:  # report every failed combination, not only the first
                    failed.append(f"{futures[future]}: {type(e).__name__}: {e}")
    if failed:
        raise RuntimeError(f"grid {stage.name}: {len(failed)} combination(s) failed:\n" + "\n".join(failed))
    (out / DONE_FILE).write_text("complete\n")


def _grid_worker(recipe, run_dir, data_dir, overrides, variables, threads) -> None:
    import torch

    torch.set_num_threads(threads)
    _setup_logging(prefix=Path(run_dir).name)
    run_recipe(recipe, run_dir, data_dir, overrides, variables=variables)


def run_report(stage: Stage, overwrite: bool = False) -> dict:
    """Aggregate a grid's outputs into a table: report.json + report.md, printed."""
    from .reports import REPORTS

    cfg = stage.config
    if cfg.report not in REPORTS:
        raise ConfigError(f"{stage.path.name}: report must be one of {sorted(REPORTS)}, got {cfg.report!r}")
    results, table = REPORTS[cfg.report](cfg.inputs, cfg.options)
    with atomic_output(cfg.output_dir, overwrite=overwrite) as tmp:
        (tmp / "report.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "report.md").write_text(table + "\n")
    print(table)
    return results


def quickstart(stem: str, run_dir: str, overwrite: bool = False) -> None:
    """Run the embedded quickstart recipe of `stem` (recipes/quickstart/<stem>/): data made in code, CPU, minutes."""
    recipe = QUICKSTART_DIR / stem
    if not recipe.is_dir():
        raise FileNotFoundError(f"no quickstart recipe for {stem!r} at {recipe}")
    start = time.time()
    files = recipe_stages(recipe)
    print(f"tokentrain quickstart {stem}: {len(files)} stages from {recipe} -> {run_dir}")
    for f in files:
        first = f.read_text().splitlines()[0]
        print(f"  {f.name:<22} {first.lstrip('# ') if first.startswith('#') else ''}")
    if overwrite and Path(run_dir).exists():
        shutil.rmtree(run_dir)
    run_recipe(recipe, run_dir, None, {})
    results = json.loads((Path(run_dir) / "eval" / "eval.json").read_text())
    diagnostic = results.pop("prior_diagnostic", None)
    print(f"\nquickstart {stem} finished in {time.time() - start:.0f} s; results on the held-out rows:")
    graded = all("accuracy" in r for r in results.values())
    print(format_accuracy_table(results) if graded else format_table(results))
    if diagnostic:
        print("PRIOR mean weight by token kind:", {k: round(v, 3) for k, v in diagnostic.items()})
    print(f"outputs: {run_dir}/ (models, scored datasets with signal_meta.json, eval/eval.json)")
    if stem == "critical_dpo":
        meta = read_meta(Path(run_dir) / "pairs_scored") or {}
        print(
            f"pairs: {meta.get('rows')}; mean rejected-token weight {meta.get('rejected_weight_mean', 0):.3f}, "
            f"{100 * meta.get('rejected_weight_above_half', 0):.1f}% of rejected tokens above 0.5"
        )
        print(
            f"see the critical tokens: tokentrain inspect {run_dir}/pairs_scored --column rejected_weights "
            "--ids-column rejected_ids --out critical.html"
        )
    else:
        print(f"see the signal: tokentrain inspect {run_dir}/scored_prior --column ref_logps --out prior.html")


RUNNERS = {
    "prepare": run_prepare,
    "generate": run_generate,
    "sft": run_train,
    "train": run_train,
    "score": run_score,
    "evaluate": run_evaluate,
    "grid": run_grid,
    "report": run_report,
}


QUICKSTART_DIR = Path(__file__).resolve().parents[1] / "recipes" / "quickstart"


# ----------------------------------------------------------------------------------------------------------- main


def _setup_logging(prefix: str = "") -> None:
    level = logging.INFO if distributed_state().is_main_process else logging.WARNING
    fmt = f"%(asctime)s [{prefix}] %(name)s: %(message)s" if prefix else "%(asctime)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", force=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="tokentrain", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a recipe folder's numbered stages in order, skipping finished ones")
    p.add_argument("recipe")
    p.add_argument("--run_dir", default=None, help="output folder of the recipe (default runs/<recipe name>)")
    p.add_argument("--data_dir", default=None, help="shared data folder (default $TOKENTRAIN_DATA or ../shared/data)")
    p.add_argument("--overwrite", action="store_true", help="redo stages whose output is already complete")
    for name in STAGES:
        # the optional stage YAML is taken from the leftover arguments (argparse would swallow a --key's value)
        p = sub.add_parser(name, help=f"run one {name} stage: [STAGE.yaml] [--key value ...]")
        p.add_argument("--run_dir", default=".")
        p.add_argument("--data_dir", default=None)
        p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("inspect", help="write an HTML heat map of a per-token signal column")
    p.add_argument("dataset")
    p.add_argument("--column", required=True)
    p.add_argument("--ids-column", default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the one named in signal_meta.json)")
    p.add_argument("--rows", type=int, default=50, help="number of rows to show")
    p.add_argument("--out", default=None, help="HTML file (default <column>.html)")
    p = sub.add_parser("quickstart", help="a complete small pipeline on CPU with data made in code")
    p.add_argument("stem", nargs="?", default="weighted_ntp", choices=sorted(OBJECTIVES))
    p.add_argument("--run_dir", default="runs/quickstart")
    p.add_argument("--overwrite", action="store_true")

    args, rest = parser.parse_known_args(argv)
    _setup_logging()
    config = rest.pop(0) if args.command in STAGES and rest and not rest[0].startswith("--") else None
    try:
        overrides = parse_override_args(rest)
        if args.command == "run":
            run_recipe(args.recipe, args.run_dir, args.data_dir, overrides, args.overwrite)
        elif args.command in STAGES:
            variables = {"run_dir": args.run_dir, "data_dir": args.data_dir or default_data_dir()}
            if config:
                # the stage's recipe variables (variables.yaml beside it), e.g. {model}; --model sets the variable
                own = recipe_variables(Path(config).parent, overrides)
                variables = {"top_dir": args.run_dir, **own, **variables}
                import yaml

                written = set(yaml.safe_load(Path(config).read_text()) or {})
                keep = {k: v for k, v in overrides.items() if k not in own or k in written}
                stage = load_stage(config, {**keep, "stage": args.command}, variables)
            else:
                stage = _stage_from_overrides(args.command, overrides, variables)
            run_stage(stage, args.overwrite)
        elif args.command == "inspect":
            _inspect(args, overrides)
        elif args.command == "quickstart":
            quickstart(args.stem, args.run_dir, args.overwrite)
    except (ConfigError, ConnectionError, FileExistsError, FileNotFoundError, KeyError, ValueError) as e:
        logger.error("%s: %s", type(e).__name__, e)
        return 2
    return exit_process(0)  # returns 0, except in a gloo multi-process run: see its docstring


def _stage_from_overrides(kind: str, overrides: dict, variables: dict) -> Stage:
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump({"stage": kind}, f)
    return load_stage(f.name, overrides, variables)


def _inspect(args, overrides) -> None:
    from .heatmap import write_heatmap

    if overrides:
        raise ConfigError(f"inspect takes no extra options: {sorted(overrides)}")
    dataset = load_rows(args.dataset)
    name = args.tokenizer or (read_meta(args.dataset) or {}).get("tokenizer")
    if not name:
        raise ConfigError("no tokenizer: pass --tokenizer (the dataset has no signal_meta.json naming one)")
    out = write_heatmap(
        dataset,
        load_tokenizer(name),
        args.column,
        args.out or f"{args.column}.html",
        ids_column=args.ids_column,
        max_rows=args.rows,
    )
    logger.info("wrote %s", out)


if __name__ == "__main__":
    sys.exit(main())
