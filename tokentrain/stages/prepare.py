"""`stage: prepare`: make the data of a task (split or generate it) and the tiny base model with its tokenizer.

Tasks: `e2e` (the shared E2E files), `e2e_synthetic` (E2E-like rows made in code) and `arith_chain` (the critical_dpo
mini experiment's problems); every one also writes `init/`, a tiny Llama with a tokenizer trained in code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import distributed_state
from .base import ConfigError, Stage, StageConfig, StageContext, stage_output

logger = logging.getLogger(__name__)

TASKS = ("e2e", "e2e_synthetic", "arith_chain")


@dataclass
class Config(StageConfig):
    task: str = field(
        default="e2e",
        metadata={"help": "'e2e' (../shared/data/e2e), 'e2e_synthetic' or 'arith_chain' (both made in code)."},
    )
    data_dir: str = field(default="{data_dir}", metadata={"help": "Folder of the shared data (task 'e2e')."})
    num_rows: int = field(default=2000, metadata={"help": "Rows generated for 'e2e_synthetic'."})
    other_slots: list = field(
        default_factory=lambda: [2, 7],
        metadata={"help": "e2e_synthetic: [min, max] slots per MR besides the name."},
    )
    noise: float = field(
        default=0.0,
        metadata={
            "help": "e2e_synthetic: probability that a description states a slot's habitual value instead of the "
            "MR's (tasks/e2e.py HABITS); the clean rows (Rho-1's RM data) are those without such a slip."
        },
    )
    vocab_size: int = field(default=512, metadata={"help": "Vocabulary of the tokenizer trained in code."})
    splits: dict = field(
        default_factory=dict,
        metadata={"help": "arith_chain: file name -> [rows, seed], e.g. {pool: [50000, 0], dev: [200, 777]}."},
    )


def run(stage: Stage, ctx: StageContext) -> None:
    from ..models import build_tiny
    from ..tasks import e2e

    cfg = stage.config
    if cfg.task == "arith_chain":
        return _prepare_arith_chain(stage, ctx)
    if cfg.task == "e2e":
        data_dir = Path(cfg.data_dir) / "e2e"
        if not data_dir.exists():
            raise FileNotFoundError(f"E2E data not found at {data_dir}: set --data_dir or $TOKENTRAIN_DATA")
        train, test = e2e.split_e2e(e2e.load_e2e(data_dir))
    elif cfg.task == "e2e_synthetic":
        if not (isinstance(cfg.other_slots, list) and len(cfg.other_slots) == 2):
            raise ConfigError(f"{stage.name}: other_slots must be [min, max], got {cfg.other_slots!r}")
        try:
            rows = e2e.make_synthetic_e2e(cfg.num_rows, cfg.seed, tuple(cfg.other_slots), cfg.noise)
        except ValueError as e:
            raise ConfigError(f"{stage.name}: {e}") from None
        train, test = e2e.split_e2e(rows, num_test=max(10, len({r["mr"] for r in rows}) // 10))
    else:
        raise ConfigError(f"{stage.name}: task must be one of {list(TASKS)}, got {cfg.task!r}")

    def fmt(rows):
        return [{**e2e.format_row(r["mr"], r["ref"]), "mr": r["mr"]} for r in rows]

    with stage_output(stage, ctx) as tmp:
        if not distributed_state().is_main_process:  # one writer: every process would write the same files
            return
        clean = [r for r in train if e2e.is_clean(r["mr"], r["ref"])]
        for name, rows in (("train", fmt(train)), ("test", fmt(test)), ("clean", fmt(clean))):
            _write_jsonl(tmp / f"{name}.jsonl", rows)
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


def _prepare_arith_chain(stage: Stage, ctx: StageContext) -> None:
    """arith_chain (spec critical_dpo section 7): one jsonl of problems per entry of `splits` ({name: [rows, seed]}),
    the character tokenizer and the 264,000-parameter Llama (hidden 64, 4 layers, 4 heads, MLP 256) in init/."""
    from ..models import char_tokenizer, tiny_llama
    from ..tasks.arithmetic import ALPHABET, make_problems

    cfg = stage.config
    if not cfg.splits:
        raise ConfigError(f"{stage.name}: arith_chain needs `splits`, e.g. {{pool: [50000, 0], dev: [200, 777]}}")
    for name, spec in cfg.splits.items():
        if not (isinstance(spec, list) and len(spec) == 2 and all(isinstance(x, int) for x in spec)):
            raise ConfigError(f"{stage.name}: splits.{name} must be [rows, seed], got {spec!r}")
    with stage_output(stage, ctx) as tmp:
        if not distributed_state().is_main_process:
            return
        for name, spec in cfg.splits.items():
            rows = [{"question_id": i, **row} for i, row in enumerate(make_problems(*spec))]
            _write_jsonl(tmp / f"{name}.jsonl", rows)
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


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
