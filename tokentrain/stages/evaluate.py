"""`stage: evaluate`: greedy decoding (+ held-out NLL) of each model on a task's rows; writes eval.json, prints a table.

Tasks: `e2e` (slot accuracy over the distinct meaning representations) and the graded ones (`gsm8k`, `math`,
`arithmetic`: accuracy with correct / wrong / unparsable counts). With several processes every process decodes its
share of the rows and the main process writes the results.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import distributed_state
from .base import ConfigError, ModelKeys, RowsStage, Stage, StageContext, load_stage_rows, stage_output
from .generate import check_fewshot

logger = logging.getLogger(__name__)


@dataclass
class Config(RowsStage, ModelKeys):
    task: str = field(default="e2e", metadata={"help": "Grading task: e2e (slot accuracy), gsm8k, math, arithmetic."})
    models: dict = field(default_factory=dict, metadata={"help": "name -> model folder, evaluated in order."})
    prior_signals: str = field(
        default="", metadata={"help": "e2e: a scored_prior dataset; adds the PRIOR weight diagnostic to eval.json."}
    )
    gold_column: str = field(default="answer", metadata={"help": "Column holding the gold answer (gsm8k, math)."})
    max_new_tokens: int = field(default=80, metadata={"help": "Greedy decoding budget."})
    batch_size: int = field(default=32, metadata={"help": "Rows per generation batch."})
    fewshot: str = field(
        default="none", metadata={"help": "Few-shot block before each prompt (gsm8k, math, none), as in generate."}
    )
    train_samples: str = field(
        default="",
        metadata={"help": "A generate output the models trained on: refuses evaluation rows that fed training."},
    )
    rows: str = field(default="all", metadata={"help": "all, or heldout (GSM8K test rows with index % 4 == 3)."})
    question_column: str = field(
        default="question", metadata={"help": "Column matched against train_samples' questions (else `prompt`)."}
    )
    heldout_nll: bool = field(default=True, metadata={"help": "Also report the models' NLL of the gold completions."})
    report_to: None | str | list[str] = field(
        default="none",
        metadata={"help": "Trackers that get the results, as in training: tensorboard, wandb, trackio, or none."},
    )


def run(stage: Stage, ctx: StageContext) -> dict:
    from ..data import prompt_ids
    from ..models import load_model, load_tokenizer
    from ..signals.ref_logps import score_ref_logps
    from ..tasks import e2e
    from ..tasks.fewshot import cut_at_stop, fewshot_prompt, stop_strings
    from ..tasks.grading import GRADERS, accuracy, gold_answers

    cfg = stage.config
    if cfg.task != "e2e" and cfg.task not in GRADERS:
        raise ConfigError(f"{stage.name}: task must be 'e2e' or one of {sorted(GRADERS)}, got {cfg.task!r}")
    if not cfg.models:
        raise ConfigError(f"{stage.name}: evaluate needs models (name -> model folder)")
    check_fewshot(stage)
    rows = evaluation_rows(stage)
    golds = None
    if cfg.task in GRADERS:
        golds = gold_answers(rows, cfg.task, cfg.gold_column, cfg.dataset, lambda i: f"evaluation row {i}")
    state = distributed_state()
    results = {}
    with stage_output(stage, ctx) as tmp:
        for name, path in cfg.models.items():
            tokenizer = load_tokenizer(path)
            model = load_model(path, merge_adapter=True, trainable=False, **cfg.model_kwargs(trainable=False))
            model = model.to(state.device)
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
            results[name] = {
                "slot_acc": realised / total,
                "realised": realised,
                "slots": total,
                "heldout_nll": nll,
                "train_seconds": read_summary(path).get("train_seconds"),
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
            if cfg.report_to not in ("none", [], None):  # as `eval/<model>/<metric>`
                from .trackers import report_to_trackers

                scalars = {f"eval_{name}/{k}": v for name, r in results.items() for k, v in r.items() if _scalar(v)}
                report_to_trackers(stage, tmp, cfg.report_to, scalars)
            models = {k: v for k, v in results.items() if k != "prior_diagnostic"}
            print(format_table(models) if cfg.task == "e2e" else format_accuracy_table(models))
    return results


def _generate_sharded(model, tokenizer, prompts, cfg, desc: str, stop_strings=()) -> list[str]:
    """Greedy completions of `prompts`, rows strided over the processes, gathered back in order on every process."""
    from ..models import generate

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


def evaluation_rows(stage: Stage):
    """The evaluation rows; `rows: heldout` keeps GSM8K test rows with index % 4 == 3. With `train_samples` naming the
    generate output the models trained on, an evaluation row whose question fed training is an error: matched by
    question text, and for `samples_from: gsm8k_solutions` (whose rows are GSM8K test rows) also by index."""
    from ..tasks.selection import is_heldout

    cfg = stage.config
    if cfg.rows not in ("all", "heldout"):
        raise ConfigError(f"{stage.name}: rows must be 'all' or 'heldout', got {cfg.rows!r}")
    if cfg.rows == "heldout" and "[" in cfg.dataset_split:
        raise ConfigError(
            f"{stage.name}: rows: heldout selects GSM8K test rows by index; a sliced split "
            f"({cfg.dataset_split!r}) would shift the indices"
        )
    rows = load_stage_rows(cfg)
    indices = list(range(len(rows)))
    if cfg.rows == "heldout":
        indices = [i for i in indices if is_heldout(i)]
    if cfg.train_samples:
        _refuse_trained_rows(stage, rows, indices)
    return rows.select(indices) if len(indices) < len(rows) else rows


def _refuse_trained_rows(stage: Stage, rows, indices: list[int]) -> None:
    """Error if an evaluation row's question fed training (`train_samples`' generate_summary.json): by question text,
    and for `samples_from: gsm8k_solutions` (GSM8K test rows) also by index."""
    from ..tasks.selection import question_hash

    cfg = stage.config
    summary_path = Path(cfg.train_samples) / "generate_summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{stage.name}: train_samples {cfg.train_samples} has no generate_summary.json")
    summary = json.loads(summary_path.read_text())
    leaked = set()
    if summary.get("question_hashes") is not None:
        column = cfg.question_column if cfg.question_column in rows.column_names else "prompt"
        if column not in rows.column_names:
            raise KeyError(f"{stage.name}: rows have neither {cfg.question_column!r} nor 'prompt' to match")
        trained, texts = set(summary["question_hashes"]), rows[column]
        leaked |= {i for i in indices if question_hash(texts[i]) in trained}
    if summary.get("samples_from") == "gsm8k_solutions":
        leaked |= set(indices) & set(summary["question_ids"])
    if leaked:
        raise ConfigError(
            f"{stage.name}: {len(leaked)} evaluation rows (first: row {min(leaked)}) are questions that fed "
            f"training ({cfg.train_samples})"
            + ("; evaluate on `rows: heldout` (index % 4 == 3)" if summary.get("samples_from") else "")
        )
    logger.info("%s: none of the %d evaluation rows fed training (%s)", stage.name, len(indices), cfg.train_samples)


def _prior_diagnostic(scored: str) -> dict:
    """Mean PRIOR weight (alpha 1, per-row normalised as in training) on value tokens vs the rest (spec section 7)."""
    import torch

    from ..data import load_rows, read_meta
    from ..losses.weighted_ntp import prior_weights
    from ..models import load_tokenizer
    from ..tasks.e2e import prior_weight_diagnostic

    rows = load_rows(scored)
    tokenizer = load_tokenizer((read_meta(scored) or {})["tokenizer"])
    weights = []
    for r in rows["ref_logps"]:
        t = torch.tensor([r], dtype=torch.float64)  # (1, k)
        weights.append(prior_weights(t, torch.ones_like(t, dtype=torch.bool), torch.zeros_like(t, dtype=torch.long))[0])
    return prior_weight_diagnostic(list(rows), tokenizer, [w.tolist() for w in weights])


def _scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_summary(model_dir) -> dict:
    path = Path(str(model_dir)) / "train_summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def format_table(results: dict) -> str:
    """Per-model rows, then `name_s<seed>` models aggregated per method as mean ± sd over seeds."""
    lines = ["| model | slot acc | held-out NLL | train s |", "|---|---|---|---|"]
    groups: dict[str, list[dict]] = {}
    for name, r in results.items():
        secs = "" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}"
        nll = "-" if r.get("heldout_nll") is None else f"{r['heldout_nll']:.4f}"
        lines.append(f"| {name} | {r['slot_acc']:.4f} ({r['realised']}/{r['slots']}) | {nll} | {secs} |")
        groups.setdefault(re.sub(r"_s\d+$", "", name), []).append(r)
    multi = {k: v for k, v in groups.items() if len(v) > 1}
    if multi:
        lines += [
            "",
            "| method | slot acc mean ± sd | held-out NLL mean ± sd | slot acc per seed |",
            "|---|---|---|---|",
        ]
        for method, rs in multi.items():
            acc, nll = [r["slot_acc"] for r in rs], [r["heldout_nll"] for r in rs if r.get("heldout_nll") is not None]
            per_seed = ", ".join(f"{a:.3f}" for a in acc)
            nll_text = f"{statistics.mean(nll):.3f} ± {statistics.stdev(nll):.3f}" if len(nll) > 1 else "-"
            lines.append(
                f"| {method} | {statistics.mean(acc):.3f} ± {statistics.stdev(acc):.3f} | {nll_text} | {per_seed} |"
            )
    return "\n".join(lines)


def format_accuracy_table(results: dict) -> str:
    """Graded tasks: per-model accuracy with its correct / wrong / unparsable counts."""
    lines = ["| model | accuracy | correct | wrong | unparsable |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {100 * r['accuracy']:.1f}% | {r['correct']} | {r['wrong']} | {r['unparsable']} |")
    return "\n".join(lines)
