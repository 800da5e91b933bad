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
import shutil
import sys
import time
from pathlib import Path

from .config import STAGES, ConfigError, Stage, default_data_dir, load_stage, parse_override_args, recipe_stages
from .data import (
    apply_templates,
    atomic_output,
    distributed_state,
    is_complete,
    load_rows,
    prompt_ids,
    read_meta,
    write_meta,
)
from .models import build_tiny, check_same_vocab, generate, load_model, load_tokenizer, vocab_size
from .trainers.critical_dpo import CriticalDPOConfig, CriticalDPOTrainer
from .trainers.weighted_ntp import WeightedNTPConfig, WeightedNTPTrainer

logger = logging.getLogger("tokentrain")

# The one registry: objective stem -> (config class, trainer class).
OBJECTIVES = {
    "weighted_ntp": (WeightedNTPConfig, WeightedNTPTrainer),
    "critical_dpo": (CriticalDPOConfig, CriticalDPOTrainer),
}


# -------------------------------------------------------------------------------------------------------- stages


def run_prepare(stage: Stage, overwrite: bool = False) -> None:
    """Make the data of a task (split or generate it) and the tiny base model with its tokenizer trained in code."""
    from .tasks import e2e

    cfg = stage.config
    if cfg.task == "e2e":
        data_dir = Path(cfg.data_dir) / "e2e"
        if not data_dir.exists():
            raise FileNotFoundError(f"E2E data not found at {data_dir}: set --data_dir or $TOKENTRAIN_DATA")
        train, test = e2e.split_e2e(e2e.load_e2e(data_dir))
    elif cfg.task == "e2e_synthetic":
        rows = e2e.make_synthetic_e2e(cfg.num_rows, cfg.seed)
        train, test = e2e.split_e2e(rows, num_test=max(10, len({r["mr"] for r in rows}) // 10))
    else:
        raise ConfigError(f"{stage.path.name}: task must be 'e2e' or 'e2e_synthetic', got {cfg.task!r}")

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
        config_cls, trainer_cls = OBJECTIVES[cfg.objective]
        meta = read_meta(cfg.dataset)
        if meta:
            _check_signal_meta(meta, tokenizer, stage)
    else:
        config_cls, trainer_cls = SFTConfig, SFTTrainer
        if cfg.drop_prompt:
            dataset = _drop_prompt_rows(dataset, tokenizer)
    peft_config = None
    if cfg.lora_r > 0:
        peft_config = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM"
        )
    with atomic_output(cfg.output_dir, overwrite=overwrite, keep_partial=True) as tmp:
        kwargs = {"report_to": "none", "logging_steps": 10, **stage.trainer_kwargs}
        args = config_cls(output_dir=str(tmp), seed=cfg.seed, **kwargs)
        trainer = trainer_cls(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
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
            (tmp / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


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
    if cfg.signal != "ref_logps":
        raise ConfigError(f"{stage.path.name}: signal must be 'ref_logps', got {cfg.signal!r}")
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


def run_evaluate(stage: Stage, overwrite: bool = False) -> dict:
    """Greedy decoding + held-out NLL of each model on the task's test rows; writes eval.json and prints a table."""

    from .signals.ref_logps import score_ref_logps
    from .tasks import e2e
    from .tasks.grading import GRADERS, accuracy

    cfg = stage.config
    if cfg.task != "e2e" and cfg.task not in GRADERS:
        raise ConfigError(f"{stage.path.name}: task must be 'e2e' or one of {sorted(GRADERS)}, got {cfg.task!r}")
    rows = _load_rows(cfg)
    results = {}
    with atomic_output(cfg.output_dir, overwrite=overwrite) as tmp:
        if distributed_state().is_main_process:
            for name, path in cfg.models.items():
                tokenizer = load_tokenizer(path)
                model = load_model(path, trainable=False)
                _, logps = score_ref_logps(rows, model, tokenizer, batch_size=cfg.batch_size)
                n_tokens = sum(map(len, logps))
                nll = -sum(map(sum, logps)) / max(n_tokens, 1)
                if cfg.task in GRADERS:
                    prompts = [prompt_ids(r, tokenizer) for r in rows]
                    texts = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, desc=name)
                    verdicts = [GRADERS[cfg.task](t, str(r[cfg.gold_column])) for t, r in zip(texts, rows)]
                    results[name] = {**accuracy(verdicts), "heldout_nll": nll}
                    logger.info("%s: %s accuracy %.4f", name, cfg.task, results[name]["accuracy"])
                    continue
                # slot accuracy is over the distinct MRs: decode each once (greedy gives one output per prompt)
                unique = list({r["mr"]: r for r in rows}.values())
                prompts = [prompt_ids(r, tokenizer) for r in unique]
                texts = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, desc=f"Decoding {name}")
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
                with open(tmp / f"outputs_{Path(str(name)).name}.jsonl", "w") as f:
                    for mr, text in zip([r["mr"] for r in unique], texts):
                        f.write(json.dumps({"mr": mr, "output": text}) + "\n")
            if cfg.prior_signals:
                results["prior_diagnostic"] = _prior_diagnostic(cfg.prior_signals)
                print(
                    "PRIOR mean weight on value-first / value-rest / other / </s> tokens:", results["prior_diagnostic"]
                )
            (tmp / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
            models = {k: v for k, v in results.items() if k != "prior_diagnostic"}
            print(format_table(models) if cfg.task == "e2e" else json.dumps(models, indent=2))
    return results


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


RUNNERS = {
    "prepare": run_prepare,
    "sft": run_train,
    "train": run_train,
    "score": run_score,
    "evaluate": run_evaluate,
}


def run_stage(stage: Stage, overwrite: bool = False) -> None:
    out = stage.config.output_dir
    if not out:
        raise ConfigError(f"{stage.path}: output_dir is required")
    if is_complete(out) and not overwrite:
        logger.info("stage %s: %s is complete, skipped (--overwrite to redo)", stage.name, out)
        return
    logger.info("stage %s (%s) -> %s", stage.name, stage.config.stage, out)
    RUNNERS[stage.config.stage](stage, overwrite)


def run_recipe(recipe: str | Path, run_dir: str | None, data_dir: str | None, overrides: dict, overwrite=False):
    recipe = Path(recipe)
    files = recipe_stages(recipe)
    variables = {
        "run_dir": run_dir or str(Path("runs") / (recipe.name if recipe.is_dir() else recipe.parent.name)),
        "data_dir": data_dir or default_data_dir(),
    }
    stages = [load_stage(f, overrides, variables, strict=False) for f in files]  # parse all before running any
    unused = [k for k in overrides if not any(k in s.trainer_kwargs or hasattr(s.config, k) for s in stages)]
    if unused:
        raise ConfigError(f"override(s) {unused} match no key of any stage in {recipe}")
    logger.info("recipe %s: %d stages -> %s", recipe, len(stages), variables["run_dir"])
    for stage in stages:
        run_stage(stage, overwrite)
    return variables["run_dir"]


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
    print(format_table(results))
    if diagnostic:
        print("PRIOR mean weight by token kind:", {k: round(v, 3) for k, v in diagnostic.items()})
    print(f"outputs: {run_dir}/ (models, scored datasets with signal_meta.json, eval/eval.json)")
    print(f"see the signal: tokentrain inspect {run_dir}/scored_prior --column ref_logps --out prior.html")


QUICKSTART_DIR = Path(__file__).resolve().parents[1] / "recipes" / "quickstart"


# ----------------------------------------------------------------------------------------------------------- main


def _setup_logging() -> None:

    level = logging.INFO if distributed_state().is_main_process else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)


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
                stage = load_stage(config, {**overrides, "stage": args.command}, variables)
            else:
                stage = _stage_from_overrides(args.command, overrides, variables)
            run_stage(stage, args.overwrite)
        elif args.command == "inspect":
            _inspect(args, overrides)
        elif args.command == "quickstart":
            quickstart(args.stem, args.run_dir, args.overwrite)
    except (ConfigError, FileExistsError, FileNotFoundError, KeyError, ValueError) as e:
        logger.error("%s: %s", type(e).__name__, e)
        return 2
    return 0


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
