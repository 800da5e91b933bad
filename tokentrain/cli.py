"""`tokentrain`: run recipes of numbered stages, or one stage, from the command line.

    tokentrain run recipes/weighted_ntp_e2e/ [--run_dir runs/e2e] [--from 05_ntp_s0 | --only 14_evaluate]
    tokentrain run recipes/critical_dpo/ --model Qwen/Qwen2.5-0.5B --05_train.learning_rate 1e-6
    tokentrain sft --config handbook_sft.yaml --max_steps 10       (or: tokentrain sft handbook_sft.yaml ...)
    tokentrain train --help                                        every key of the stage and its trainer config
    tokentrain inspect runs/x/scored --column ref_logps --out heat.html
    tokentrain plot runs/critical_dpo_mini                         PNG plots of a run into runs/.../plots
    tokentrain quickstart weighted_ntp
    tokentrain launch --accelerate_config zero3 recipes/weighted_ntp/

Every stage writes to `<output_dir>.tmp/` and renames it when complete, with stage.json (its resolved config and
inputs). A finished stage is skipped only when it would do identical work; a changed one stops with the changed keys.
This module only parses arguments and dispatches: `tokentrain --help` imports neither torch nor TRL.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .objectives import OBJECTIVES
from .stages import STAGES

logger = logging.getLogger("tokentrain")

ERRORS = (ConnectionError, FileExistsError, FileNotFoundError, KeyError, ValueError)  # ConfigError is a ValueError


def build_parser() -> argparse.ArgumentParser:
    kinds = "\n".join(f"  {k:<10} {STAGES[k][1]}" for k in STAGES)
    parser = argparse.ArgumentParser(
        prog="tokentrain",
        description=__doc__ + f"\nstage kinds (tokentrain <kind> --help lists its keys):\n{kinds}\n\n"
        f"objectives (stage train, --objective): {', '.join(OBJECTIVES)}; TRL baselines: sft, dpo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run a recipe folder's numbered stages in order")
    p.add_argument("recipe", help="a recipe folder (or one stage file)")
    p.add_argument("--run_dir", default=None, help="output folder of the recipe (default runs/<recipe name>)")
    p.add_argument("--data_dir", default=None, help="shared data folder (default $TOKENTRAIN_DATA or ../shared/data)")
    p.add_argument("--overwrite", action="store_true", help="redo every stage, finished or not")
    p.add_argument("--from", dest="start", default=None, metavar="STAGE", help="redo STAGE and every stage after it")
    p.add_argument("--only", default=None, metavar="STAGE", help="redo STAGE alone")
    for kind, (_, text) in STAGES.items():
        p = sub.add_parser(kind, help=text, add_help=False)  # --help lists the stage's keys (stage_help)
        p.add_argument("--config", default=None)
        p.add_argument("--run_dir", default=".")
        p.add_argument("--data_dir", default=None)
        p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("inspect", help="write an HTML heat map of a per-token signal column")
    p.add_argument("dataset", help="a scored dataset folder (a score stage's output)")
    p.add_argument("--column", required=True, help="the per-token column to show, e.g. ref_logps, rejected_weights")
    p.add_argument("--ids_column", default=None, help="its token ids (default: completion_ids, or <side>_ids)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the one named in signal_meta.json)")
    p.add_argument("--rows", type=_row_list, default=None, help="rows to show, e.g. 3,17,40 (default: all)")
    p.add_argument("--max_rows", type=int, default=50, help="show at most this many rows")
    p.add_argument(
        "--sort", choices=("index", "max", "mean"), default="index", help="row order: largest max/mean first"
    )
    p.add_argument(
        "--weights",
        choices=("raw", "effective"),
        default="raw",
        help="effective: what the trainer multiplies each token's loss by (PRIOR's normalised weights, Rho-1's "
        "selection), computed with the trainer's own functions",
    )
    p.add_argument("--weighting", choices=("prior", "rho1"), default=None, help="with --weights effective on ref_logps")
    p.add_argument("--prior_alpha", type=float, default=1.0, help="PRIOR's exponent (the trainer's prior_alpha)")
    p.add_argument("--rho1_ratio", type=float, default=0.6, help="Rho-1's kept share (the trainer's rho1_ratio)")
    p.add_argument("--model", default=None, help="Rho-1: the policy whose excess loss selects the tokens")
    p.add_argument("--task", default=None, help="grade each response against the row's gold answer: arithmetic, ...")
    p.add_argument("--out", default=None, help="HTML file (default <column>.html)")
    p = sub.add_parser("plot", help="write PNG plots of a run folder (training curves, grids, weights)")
    p.add_argument("run_dir", help="a run folder (tokentrain run's --run_dir) or any stage output inside it")
    p.add_argument("--out", default=None, help="folder of the PNGs (default <run_dir>/plots)")
    p = sub.add_parser(
        "quickstart",
        help="a complete small pipeline on CPU with data made in code",
        epilog="Any other --key value (every stage) or --<stage>.key value (one stage) overrides the quickstart "
        "recipe's keys, as with `tokentrain run`.",
    )
    p.add_argument("stem", nargs="?", default="weighted_ntp", help=f"one of {', '.join(_quickstarts())}")
    p.add_argument("--run_dir", default=None, help="default runs/quickstart/<stem>")
    p.add_argument("--overwrite", action="store_true", help="redo every stage")
    sub.add_parser("launch", help="accelerate launch a recipe, locally or under SLURM (the shipped launch.sh)")
    return parser


def _quickstarts() -> list[str]:
    from .quickstart import QUICKSTARTS

    return sorted(p.name for p in QUICKSTARTS.iterdir() if p.is_dir())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "launch":  # everything after `launch` belongs to launch.sh
        return _launch(argv[1:])
    if len(argv) >= 2 and argv[0] in STAGES and ("--help" in argv or "-h" in argv):
        try:
            from .stage_help import stage_help

            print(stage_help(argv[0], argv[1:]))
        except ERRORS as e:
            print(f"tokentrain {argv[0]}: {e}", file=sys.stderr)
            return 2
        return 0
    args, rest = build_parser().parse_known_args(argv)
    _deepspeed_on_cpu()
    from .runtime import exit_process, quiet_console, setup_logging

    setup_logging()
    quiet_console()
    try:
        _dispatch(args, rest)
    except ERRORS as e:
        logger.error("%s: %s", type(e).__name__, e)
        return exit_process(2)
    return exit_process(0)  # returns 0, except in a gloo multi-process run: see its docstring


def _deepspeed_on_cpu() -> None:
    """Without CUDA, tell DeepSpeed (when installed) its accelerator is the CPU: transformers and accelerate import it,
    and its auto-detection would otherwise print a warning in every run."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _dispatch(args, rest: list[str]) -> None:
    from .config import parse_override_args

    if args.command in ("inspect", "plot"):
        if rest:
            raise ValueError(f"{args.command} takes no extra options: {rest}")
        return _inspect(args) if args.command == "inspect" else _plot(args)
    if args.command == "quickstart":
        from .quickstart import quickstart

        return quickstart(args.stem, args.run_dir, args.overwrite, parse_override_args(rest))
    if args.command in STAGES:
        # the optional stage file is the first leftover argument (argparse would take a --key's value for it)
        args.file = rest.pop(0) if rest and not rest[0].startswith("-") else None
    overrides = parse_override_args(rest)
    if args.command == "run":
        from .recipes import run_recipe

        run_recipe(
            args.recipe, args.run_dir, args.data_dir, overrides, args.overwrite, start=args.start, only=args.only
        )
        return
    _run_one_stage(args, overrides)


def _stage_file(args) -> Path | None:
    if args.file and args.config:
        raise ValueError(f"give the stage file once: positional {args.file!r} or --config {args.config!r}")
    name = args.file or args.config
    if name is None:
        return None
    path = Path(name)
    if path.is_dir():
        raise ValueError(f"--config {name} is a folder: give a stage YAML file (a recipe folder runs with `run`)")
    if not path.is_file():
        raise FileNotFoundError(f"stage file not found: {name}")
    return path


def _run_one_stage(args, overrides: dict) -> None:
    """`tokentrain <kind> [FILE | --config FILE] [--key value ...]`: one stage, named after its file."""
    from .config import default_data_dir, load_stage, recipe_variables, stage_from_mapping
    from .recipes import SubRecipes, run_stage

    if any("." in k for k in overrides):
        raise ValueError(f"scoped overrides (--<stage>.<key>) belong to `tokentrain run`; got {sorted(overrides)}")
    data_dir = args.data_dir or default_data_dir()
    variables = {"run_dir": args.run_dir, "top_dir": args.run_dir, "data_dir": data_dir}
    path = _stage_file(args)
    if path is None:
        stage = stage_from_mapping({}, None, overrides, variables, kind=args.command)
    else:
        # the recipe's variables (variables.yaml beside the file), e.g. {model}; --model sets the variable
        own = recipe_variables(path.parent, overrides)
        import yaml

        written = set(yaml.safe_load(path.read_text()) or {})
        keep = {k: v for k, v in overrides.items() if k not in own or k in written}
        stage = load_stage(path, keep, {**own, **variables}, kind=args.command)
    run_stage(stage, args.overwrite, SubRecipes(data_dir))


def _launch(argv: list[str]) -> int:
    """The shipped launch.sh with these arguments (replaces this process)."""
    from .quickstart import shipped

    script = shipped() / "launch.sh"
    os.execvp("bash", ["bash", str(script), *argv])
    return 0  # not reached


def _row_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--rows takes row indices separated by commas, e.g. 3,17,40; got {text!r}"
        ) from None


def _inspect(args) -> None:
    from .data import load_rows, read_meta
    from .heatmap import effective_weights, write_heatmap
    from .models import load_model, load_tokenizer

    dataset = load_rows(args.dataset)
    name = args.tokenizer or (read_meta(args.dataset) or {}).get("tokenizer")
    if not name:
        raise ValueError("no tokenizer: pass --tokenizer (the dataset has no signal_meta.json naming one)")
    tokenizer = load_tokenizer(name)
    rows = args.rows
    if rows is None and args.sort == "index":  # the rows that will be shown: effective weights of those only
        rows = list(range(min(len(dataset), args.max_rows)))
    values = note = None
    try:
        if args.weights == "effective":
            policy = load_model(args.model, trainable=False, merge_adapter=True) if args.model else None
            values, note = effective_weights(
                dataset, args.column, args.weighting, rows, args.prior_alpha, args.rho1_ratio, policy, tokenizer
            )
        elif args.weighting or args.model:
            raise ValueError("--weighting and --model belong to --weights effective")
        out = write_heatmap(
            dataset,
            tokenizer,
            args.column,
            args.out or f"{args.column}.html",
            ids_column=args.ids_column,
            rows=rows,
            max_rows=args.max_rows,
            sort=args.sort,
            values=values,
            values_note=note,
            task=args.task,
        )
    except IndexError as e:  # a --rows index out of range
        raise ValueError(str(e)) from None
    logger.info("wrote %s", out)


def _plot(args) -> None:
    from .plots import plot_run

    try:
        written = plot_run(args.run_dir, args.out)
    except ImportError as e:  # matplotlib, an optional dependency: the message says how to install it
        raise ValueError(str(e)) from None
    logger.info("wrote %d plots to %s", len(written), Path(args.out or Path(args.run_dir) / "plots"))


if __name__ == "__main__":
    sys.exit(main())
