"""`stage: evaluate`, tasks `keyword_length` and `generations`: sample each model once per prompt and measure it
(spec aligndistil sections 4, 7 and 8).

Both tasks draw one sample per prompt at temperature 1, top_p 1, top_k 0 (every sampling setting explicit), cut after
the first EOS, and report per model: the mean response length in tokens, the fraction cut at `max_new_tokens`, and the
sequence KL(π_model ‖ π_kl_model) on the model's own samples (Σ_t of the full-vocabulary KL; `kl_model` is the DPO
model). They write `generations_<name>.jsonl` (instruction, output, generator: the AlpacaEval layout, plus length
and KL) and `eval.json`, and print a table. From each model folder's train_summary.json they add the mean α_t of an
aligndistil run and the held-out reward curve a training stage logged (`reward_curve_dataset`).

`keyword_length` (the mini experiment) adds the true reward, the keyword rate, the win rate against `baseline` (one
sample each per prompt, a tie counts 0.5) and, from `alpha_scores` (a `score` stage's output, signal
`aligndistil_alpha`), the mean α_t at positions that predict the keyword, <eos> or another word. `generations` (the
real-scale recipe) writes the samples for external judging (AlpacaEval 2, Arena-Hard, MT-Bench: not run here).
With several processes every process samples its share of the prompts and the main process writes the results.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import distributed_state
from .base import ConfigError, ModelKeys, RowsStage, Stage, StageContext, load_stage_rows, require, stage_output

logger = logging.getLogger(__name__)

TASKS = ("keyword_length", "generations")
DEFAULT_MAX_NEW_TOKENS = {"keyword_length": 14, "generations": 1024}


@dataclass
class Config(RowsStage, ModelKeys):
    task: str = field(default="keyword_length", metadata={"help": "keyword_length (mini task) or generations."})
    models: dict = field(default_factory=dict, metadata={"help": "name -> model folder, evaluated in order."})
    kl_model: str = field(default="", metadata={"help": "The model of KL(π_model ‖ π_kl_model): the DPO model."})
    baseline: str = field(
        default="dpo", metadata={"help": "keyword_length: the model (a name in `models`) of the win rates."}
    )
    alpha_scores: str = field(
        default="", metadata={"help": "keyword_length: a score output (signal aligndistil_alpha): α_t by token kind."}
    )
    max_new_tokens: int = field(default=0, metadata={"help": "Sample length (0: 14 for keyword_length, 1024 else)."})
    batch_size: int = field(default=64, metadata={"help": "Prompts per generation batch."})
    chunk_tokens: int = field(default=256, metadata={"help": "Positions projected through the heads at once (KL)."})


def run(stage: Stage, ctx: StageContext) -> dict:
    from ..data import prompt_ids
    from ..models import check_auxiliary_models, load_model, load_tokenizer

    cfg = stage.config
    _check(stage)
    rows = load_stage_rows(cfg)
    needed = ["prompt", "keyword"] if cfg.task == "keyword_length" else ["prompt"]
    missing = [c for c in needed if c not in rows.column_names]
    if missing:
        raise KeyError(f"{stage.name}: {cfg.dataset} lacks column(s) {missing} (has {rows.column_names})")
    state = distributed_state()
    mine = list(range(state.process_index, len(rows), state.num_processes))
    kwargs = cfg.model_kwargs(trainable=False)
    reference = load_model(cfg.kl_model, merge_adapter=True, trainable=False, **kwargs).to(state.device)
    per_row, results = {}, {}
    with stage_output(stage, ctx) as tmp:
        for name, path in cfg.models.items():
            tokenizer = load_tokenizer(path)
            model = load_model(path, merge_adapter=True, trainable=False, **kwargs).to(state.device)
            check_auxiliary_models(
                tokenizer, [(model, f"model {name} ({path})"), (reference, f"kl_model ({cfg.kl_model})")]
            )
            prompts = [prompt_ids(rows[i], tokenizer) for i in mine]
            records = _sample_rows(model, reference, tokenizer, prompts, [rows[i] for i in mine], cfg, name)
            per_row[name] = _gather(list(zip(mine, records)), len(rows))
            del model
            if state.is_main_process:
                results[name] = {**_summarise(per_row[name], cfg.task), **_training(path)}
                with open(tmp / f"generations_{Path(str(name)).name}.jsonl", "w") as f:
                    for record in per_row[name]:
                        f.write(json.dumps(record) + "\n")
                logger.info("%s: %s", name, {k: v for k, v in results[name].items() if not isinstance(v, list)})
        if not state.is_main_process:
            return {}
        if cfg.task == "keyword_length":
            _add_win_rates(results, per_row, cfg.baseline)
        out = {"models": results, "task": cfg.task, "prompts": len(rows), "seed": cfg.seed}
        if cfg.alpha_scores:
            out["alpha_by_kind"] = _alpha_by_kind(cfg.alpha_scores)
        (tmp / "eval.json").write_text(json.dumps(out, indent=2) + "\n")
        print(format_table(results))
        if "alpha_by_kind" in out:
            print("mean α_t by the token predicted:", _alpha_line(out["alpha_by_kind"]))
    return out


def _check(stage: Stage) -> None:
    cfg = stage.config
    if cfg.task not in TASKS:
        raise ConfigError(f"{stage.name}: task must be one of {list(TASKS)}, got {cfg.task!r}")
    require(stage, "dataset", "kl_model", why="(the KL to the DPO model)")
    if not cfg.models:
        raise ConfigError(f"{stage.name}: evaluate needs models (name -> model folder)")
    if cfg.task == "keyword_length" and cfg.baseline and cfg.baseline not in cfg.models:
        raise ConfigError(f"{stage.name}: baseline {cfg.baseline!r} is not one of the models {list(cfg.models)}")
    if cfg.task != "keyword_length":
        idle = [k for k in ("baseline", "alpha_scores") if k in stage.given]
        if idle:
            raise ConfigError(f"{stage.name}: {', '.join(idle)} has no effect with task {cfg.task!r}: remove it")
    if cfg.max_new_tokens < 0 or cfg.batch_size < 1 or cfg.chunk_tokens < 1:
        raise ConfigError(f"{stage.name}: max_new_tokens must be >= 1 (0: default), batch_size and chunk_tokens >= 1")
    cfg.max_new_tokens = cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[cfg.task]


def _sample_rows(model, reference, tokenizer, prompts, rows, cfg, name) -> list[dict]:
    """One sample per prompt (seeded by the stage seed and the process), its length, KL and (keyword_length) reward."""
    from ..models import cut_after_eos, sample
    from ..signals.aligndistil_alpha import sequence_kl
    from ..tasks.keyword_length import score_samples

    state = distributed_state()
    seed = cfg.seed + 7919 * state.process_index
    samples = sample(model, tokenizer, prompts, cfg.max_new_tokens, batch_size=cfg.batch_size, seed=seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kls = sequence_kl(model, reference, prompts, samples, pad, cfg.batch_size, cfg.chunk_tokens)
    scored = score_samples(samples, [r["keyword"] for r in rows], tokenizer) if cfg.task == "keyword_length" else None
    records = []
    for k, (row, ids, kl) in enumerate(zip(rows, samples, kls)):
        body, ended = cut_after_eos(ids, tokenizer.eos_token_id)
        record = {
            "instruction": _instruction(row["prompt"]),
            # keyword_length counts every token before EOS as a word: keep special tokens sampled mid-response visible
            "output": tokenizer.decode(
                body[: len(body) - int(ended)], skip_special_tokens=cfg.task != "keyword_length"
            ),
            "generator": name,
            "length": len(body) - int(ended),  # tokens before EOS
            "truncated": not ended,
            "kl": kl,
        }
        if scored is not None:
            record.update(reward=scored["reward"][k], keyword=scored["keyword"][k])
        records.append(record)
    return records


def _instruction(prompt) -> str:
    """The prompt as text (a chat prompt: its last user message), AlpacaEval's `instruction`."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return users[-1] if users else json.dumps(prompt)
    return prompt


def _gather(pairs: list[tuple[int, dict]], n: int) -> list[dict]:
    if distributed_state().num_processes > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(pairs)
    done = dict(pairs)
    return [done[i] for i in range(n)]


def _summarise(records: list[dict], task: str) -> dict:
    out = {
        "length": statistics.mean(r["length"] for r in records),
        "truncated_frac": statistics.mean(r["truncated"] for r in records),
        "kl_to_kl_model": statistics.mean(r["kl"] for r in records),
    }
    if task == "keyword_length":
        out["reward"] = statistics.mean(r["reward"] for r in records)
        out["keyword_rate"] = statistics.mean(r["keyword"] for r in records)
    return out


def _training(path) -> dict:
    """From the model folder's train_summary.json: train seconds, the mean α_t of an aligndistil run (the mean of its
    logged `aligndistil/alpha_mean`, equal windows) and the held-out reward curve, when there are."""
    from ..tasks.keyword_length import reward_curve

    summary_path = Path(str(path)) / "train_summary.json"
    if not summary_path.exists():
        return {}
    summary = json.loads(summary_path.read_text())
    history = summary.get("log_history", [])
    out = {"train_seconds": summary.get("train_seconds")}
    alphas = [e["aligndistil/alpha_mean"] for e in history if "aligndistil/alpha_mean" in e]
    if alphas:
        out["alpha_mean"] = statistics.mean(alphas)
    curve = reward_curve(history)
    if curve:
        out["reward_curve"] = curve
    return out


def _add_win_rates(results: dict, per_row: dict, baseline: str) -> None:
    from ..tasks.keyword_length import win_rate

    if not baseline:
        return
    base = [r["reward"] for r in per_row[baseline]]
    for name in results:
        results[name]["win_rate"] = win_rate([r["reward"] for r in per_row[name]], base)


def _alpha_by_kind(folder: str) -> dict:
    from ..data import load_rows, read_meta
    from ..models import load_tokenizer
    from ..tasks.keyword_length import alpha_by_kind

    meta = read_meta(folder) or {}
    if meta.get("signal") != "aligndistil_alpha":
        raise ValueError(f"alpha_scores {folder} is not an aligndistil_alpha score output (signal_meta.json)")
    scored = load_rows(folder)
    tokenizer = load_tokenizer(meta["tokenizer"])
    return alpha_by_kind(scored["completion_ids"], scored["aligndistil_alpha"], scored["keyword"], tokenizer)


def _alpha_line(kinds: dict) -> str:
    return ", ".join(
        f"{k} {v['alpha_mean']:.3f} ({v['positions']} positions)" for k, v in kinds.items() if v["positions"]
    )


def format_table(results: dict) -> str:
    """One row per model: reward, keyword rate, win rate (keyword_length), length, truncated, KL, mean α_t; then the
    `<method>_s<seed>` models aggregated per method as mean ± sd."""
    graded = all("reward" in r for r in results.values())
    cols = (["reward", "keyword_rate", "win_rate"] if graded else []) + [
        "length",
        "truncated_frac",
        "kl_to_kl_model",
        "alpha_mean",
    ]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        cells = ["-" if r.get(c) is None else f"{r[c]:.3f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    groups: dict[str, list[dict]] = {}
    for name, r in results.items():
        groups.setdefault(re.sub(r"_s\d+$", "", name), []).append(r)
    multi = {k: v for k, v in groups.items() if len(v) > 1}
    if multi:
        lines += ["", "| method | " + " | ".join(f"{c} mean ± sd" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for method, rs in multi.items():
            cells = []
            for c in cols:
                values = [r[c] for r in rs if r.get(c) is not None]
                cells.append(
                    f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else "-"
                )
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
