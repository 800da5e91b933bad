"""`stage: evaluate`, task `concept_heads`: greedy exact match and the per-head diagnostic of the CAFT paper (spec
`specs/concept_heads.md` sections 4 and 7).

For each model (a folder; a LoRA adapter is merged into its base first):
- **Exact match** (`exact_match: true`): greedy decoding from each row's prompt (tokenised as the trainer does), at
  most `max_new_tokens`; a row is correct when the model ends with EOS and the text before it (special tokens
  skipped) equals the row's `completion` exactly. No EOS within the budget: wrong. With a boolean column `seen`
  (the equation task: the test equation also occurs in train) the rate is also given on the seen and unseen rows.
- **Per-head CE and top-1 accuracy** (`heads_path`): the *same frozen phase-1 heads* are attached to every model
  (`AuxHeads.load`, strict) and scored teacher-forced on the reference answers (prompt + completion + EOS, labels on
  the completion as in training): head i predicts token t + 1 + i, head 0 is the model's own next-token head. After
  CAFT these losses should end lower than after NTP: the trunk learnt to carry the later tokens.

Writes `eval.json` ({model: metrics}) and `outputs_<model>.jsonl` (prompt, reference, output, eos, correct), and
prints a table. Rows are shared out over the processes; sums and outputs are gathered, the main process writes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import distributed_state
from .base import ConfigError, ModelKeys, RowsStage, Stage, StageContext, load_stage_rows, stage_output

logger = logging.getLogger(__name__)


@dataclass
class Config(RowsStage, ModelKeys):
    task: str = field(default="concept_heads", metadata={"help": "'concept_heads': exact match and per-head metrics."})
    models: dict = field(default_factory=dict, metadata={"help": "name -> model folder, evaluated in order."})
    heads_path: str = field(
        default="",
        metadata={
            "help": "Frozen phase-1 heads (a phase-heads run's <output_dir>/heads) attached to every model for the "
            "per-head CE and accuracy; empty: no per-head metrics."
        },
    )
    exact_match: bool = field(
        default=True, metadata={"help": "Greedy exact match of the completion (false: per-head metrics only)."}
    )
    max_new_tokens: int = field(default=9, metadata={"help": "Greedy decoding budget (EOS included)."})
    batch_size: int = field(default=256, metadata={"help": "Rows per generation or scoring batch."})


def run(stage: Stage, ctx: StageContext) -> dict:
    from ..heads import read_heads_config
    from ..models import load_model, load_tokenizer
    from .evaluate import read_summary

    cfg = stage.config
    if cfg.task != "concept_heads":
        raise ConfigError(f"{stage.name}: task must be 'concept_heads' here, got {cfg.task!r}")
    if not cfg.models:
        raise ConfigError(f"{stage.name}: evaluate needs models (name -> model folder)")
    if not cfg.exact_match and not cfg.heads_path:
        raise ConfigError(f"{stage.name}: nothing to measure: set heads_path (per-head metrics) or exact_match: true")
    for key in ("max_new_tokens", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{stage.name}: {key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.heads_path:
        read_heads_config(cfg.heads_path)  # both files there, before any model is loaded
    rows = load_stage_rows(cfg)
    missing = [c for c in ("prompt", "completion") if c not in rows.column_names]
    if missing:
        raise ConfigError(
            f"{stage.name}: the evaluation rows lack {missing} (columns {rows.column_names}); set prompt_template and "
            "completion_template"
        )
    rows = list(rows)
    seen = [r.get("seen") for r in rows]
    if any(s is not None for s in seen) and not all(isinstance(s, bool) for s in seen):
        bad = next(i for i, s in enumerate(seen) if not isinstance(s, bool))
        raise ValueError(f"{stage.name}: row {bad}: column 'seen' must be true or false, got {seen[bad]!r}")
    state = distributed_state()
    results = {}
    with stage_output(stage, ctx) as tmp:
        for name, path in cfg.models.items():
            tokenizer = load_tokenizer(path)
            model = load_model(path, merge_adapter=True, trainable=False, **cfg.model_kwargs(trainable=False))
            model = model.to(state.device)
            result: dict = {}
            if cfg.exact_match:
                outputs = exact_match_outputs(model, tokenizer, rows, cfg.max_new_tokens, cfg.batch_size)
                result.update(exact_match_rates(outputs, seen))
                if state.is_main_process:
                    with open(tmp / f"outputs_{Path(str(name)).name}.jsonl", "w") as f:
                        for row, out in zip(rows, outputs):
                            record = {"prompt": row["prompt"], "reference": row["completion"], **out}
                            f.write(json.dumps({**record, **({"seen": row["seen"]} if "seen" in row else {})}) + "\n")
            if cfg.heads_path:
                result.update(head_metrics(model, tokenizer, rows, cfg.heads_path, cfg.batch_size))
            result["train_seconds"] = read_summary(path).get("train_seconds")
            results[name] = result
            logger.info("%s: %s", name, _summary_line(result))
        if state.is_main_process:
            (tmp / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
            print(format_table(results))
    return results


def _summary_line(r: dict) -> str:
    parts = []
    if "exact_match" in r:
        parts.append(
            f"exact match {100 * r['exact_match']:.1f}% ({r['correct']}/{r['rows']}, {r['no_eos']} without EOS)"
        )
    if "acc" in r:
        parts.append("per-head accuracy " + " ".join(f"{a:.3f}" for a in r["acc"]))
        parts.append("CE " + " ".join(f"{c:.3f}" for c in r["ce"]))
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------- exact match


def _shard(n: int) -> list[int]:
    state = distributed_state()
    return list(range(state.process_index, n, state.num_processes))


def _gather(pairs: list) -> list:
    """This process's (index, value) pairs -> every process's values in index order."""
    state = distributed_state()
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(pairs)
    done = dict(pairs)
    return [done[i] for i in range(len(done))]


def exact_match_outputs(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int) -> list[dict]:
    """Greedy output per row: {output (text before EOS, special tokens skipped), eos (bool), correct (bool)}."""
    from ..data import prompt_ids

    mine = _shard(len(rows))
    prompts = [prompt_ids(rows[i], tokenizer) for i in mine]
    generated = greedy_ids(model, tokenizer, prompts, max_new_tokens, batch_size)
    pairs = []
    for i, (ids, eos) in zip(mine, generated):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        pairs.append((i, {"output": text, "eos": eos, "correct": eos and text == rows[i]["completion"]}))
    return _gather(pairs)


def exact_match_rates(outputs: list[dict], seen: list) -> dict:
    """Rates over all rows, and over the `seen` / unseen ones when the rows say which."""

    def rate(indices):
        return sum(outputs[i]["correct"] for i in indices) / max(len(indices), 1)

    every = range(len(outputs))
    out = {
        "exact_match": rate(every),
        "correct": sum(o["correct"] for o in outputs),
        "rows": len(outputs),
        "no_eos": sum(not o["eos"] for o in outputs),
    }
    if all(isinstance(s, bool) for s in seen) and seen:
        for label, want in (("seen", True), ("unseen", False)):
            subset = [i for i in every if seen[i] is want]
            out[f"exact_match_{label}"] = rate(subset)
            out[f"rows_{label}"] = len(subset)
    return out


def greedy_ids(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list:
    """Greedy continuations of tokenised prompts (left-padded batches, longest first): per prompt (the generated ids
    before the first EOS, whether an EOS came). A fresh generation config: the model's own defaults (a repetition
    penalty, sampling) never apply."""
    import torch
    from transformers import GenerationConfig

    from ..signals.self_distill import stop_token_ids
    from ..tokens import left_padded

    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad_id, num_beams=1
    )
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: dict[int, tuple[list[int], bool]] = {}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, attention_mask = left_padded([prompts[i] for i in batch], pad_id)  # (B, T)
            width = input_ids.shape[1]
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
            )
            for b, i in enumerate(batch):
                ids = generated[b, width:].tolist()
                end = next((j for j, t in enumerate(ids) if t in stops), None)
                out[i] = (ids if end is None else ids[:end], end is not None)
    return [out[i] for i in range(len(prompts))]


# ------------------------------------------------------------------------------------------------ per-head metrics


def head_metrics(model, tokenizer, rows: list[dict], heads_path: str, batch_size: int) -> dict:
    """Teacher-forced CE and top-1 accuracy of every head (0 = the model's own) on the reference completions, with the
    frozen heads of `heads_path`: {ce, acc, count} lists of H + 1. Chunked like training (no (B, T, V) logits)."""
    import torch

    from ..data import tokenize_row
    from ..heads import AuxHeads
    from ..tokens import IGNORE_INDEX

    heads = AuxHeads.load(model, heads_path)  # strict: another model's heads are an error naming the field
    try:
        mine = _shard(len(rows))
        encoded = [tokenize_row(rows[i], tokenizer) for i in mine]
        encoded.sort(key=lambda e: -len(e["input_ids"]))  # little padding
        device = next(model.parameters()).device
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        n_heads = heads.config.num_aux_heads + 1
        totals = {"nll": torch.zeros(n_heads, dtype=torch.float64), "correct": torch.zeros(n_heads, dtype=torch.long)}
        totals["count"] = torch.zeros(n_heads, dtype=torch.long)
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            width = max(len(e["input_ids"]) for e in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T) right-padded
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, e in enumerate(batch):
                n = len(e["input_ids"])
                input_ids[b, :n] = torch.tensor(e["input_ids"])
                labels[b, :n] = torch.tensor(e["labels"])
                attention_mask[b, :n] = 1
            scored = heads.score(model, input_ids.to(device), labels.to(device), attention_mask.to(device))
            for key in totals:
                totals[key] += scored[key].to(totals[key].dtype)
    finally:
        heads.detach(model)
    state = distributed_state()
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object([{k: v.tolist() for k, v in totals.items()}])
        totals = {k: torch.tensor([p[k] for p in parts]).sum(0) for k in totals}
    count = totals["count"].clamp(min=1).double()
    return {
        "ce": (totals["nll"].double() / count).tolist(),
        "acc": (totals["correct"].double() / count).tolist(),
        "count": totals["count"].tolist(),
    }


# ------------------------------------------------------------------------------------------------------- table


def format_table(results: dict) -> str:
    """One row per model: exact match (all / seen / unseen, %) and per-head accuracy and CE (head 0 = NTP)."""
    n_heads = max((len(r["acc"]) for r in results.values() if "acc" in r), default=0)
    em = any("exact_match" in r for r in results.values())
    subsets = any("exact_match_seen" in r for r in results.values())
    header = ["model"]
    if em:
        header += ["EM all %", "EM seen %", "EM unseen %"] if subsets else ["EM %"]
    header += [f"acc_{i}" for i in range(n_heads)] + [f"CE_{i}" for i in range(n_heads)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        cells = [name]
        if em:
            keys = ["exact_match", "exact_match_seen", "exact_match_unseen"] if subsets else ["exact_match"]
            cells += [f"{100 * r[k]:.1f}" if k in r else "" for k in keys]
        if "acc" in r:
            cells += [f"{a:.3f}" for a in r["acc"]] + [f"{c:.3f}" for c in r["ce"]]
        else:
            cells += [""] * (2 * n_heads)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
