"""What every stage shares: the common keys, the parsed `Stage`, and its output folder.

A stage writes to `<output_dir>.tmp/` and renames it to `<output_dir>/` when complete, with `_COMPLETE` and
`stage.json` (its resolved config and inputs, see provenance.py) inside: nothing half-written is ever read as a
finished output, and tokentrain only ever deletes folders that carry its own marker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import provenance
from ..runtime import distributed_state

logger = logging.getLogger(__name__)

DONE_FILE = "_COMPLETE"


# Trainer keys transformers 5 renamed: (old, new). Either is accepted; train stages pass the new one.
RENAMED_TRAINER_KEYS = (
    ("gradient_checkpointing", "activation_checkpointing"),
    ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
)


class ConfigError(ValueError):
    """A recipe key, value or type is wrong; the message names the file and key."""


@dataclass
class StageConfig:
    """Keys common to every stage."""

    stage: str = field(default="", metadata={"help": "Stage kind (see `tokentrain --help`)."})
    output_dir: str = field(default="", metadata={"help": "Output folder (relative paths are under run_dir)."})
    seed: int = field(default=0, metadata={"help": "Random seed of the stage."})

    def trainer_config_class(self):
        """The trainer config dataclass whose fields the stage's other keys set (None: the stage has no trainer)."""
        return None


@dataclass
class RowsStage(StageConfig):
    """Keys of the stages that read rows: where they come from and how prompt/completion are built."""

    dataset: str = field(
        default="",
        metadata={
            "help": "Rows: a jsonl/json/csv file, a stage folder or a hub name.",
            "aliases": ["--dataset_name"],
        },
    )
    dataset_split: str = field(
        default="train",
        metadata={"help": "Split of the dataset; 'train[:64]' slices.", "aliases": ["--dataset_train_split"]},
    )
    dataset_config: str = field(default="", metadata={"help": "Config name of a hub dataset (e.g. 'main')."})
    prompt_template: str = field(
        default="", metadata={"help": "Build `prompt` from each row's columns, e.g. 'Question: {question}\\nAnswer:'."}
    )
    completion_template: str = field(
        default="", metadata={"help": "Build `completion` from each row's columns, e.g. ' {answer}'."}
    )


@dataclass
class ModelKeys:
    """How a stage loads its models (TRL's ModelConfig names)."""

    dtype: str = field(
        default="",
        metadata={
            "help": "Weights dtype: auto, float32, bfloat16 or float16. Default: float32 for a model that trains "
            "(autocast does bf16, as TRL), bfloat16 for frozen models on a bf16 GPU, else float32.",
            "aliases": ["--torch_dtype"],
        },
    )
    attn_implementation: str = field(
        default="", metadata={"help": "Attention implementation: eager, sdpa, flash_attention_2 (default: model's)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow a hub model's own code."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a hub model."})

    def __post_init__(self):
        if self.dtype and self.dtype not in DTYPES:
            usual = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float": "float32", "half": "float16"}
            hint = f" (did you mean {usual[self.dtype]}?)" if self.dtype in usual else ""
            raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}{hint}")

    def model_kwargs(self, trainable: bool) -> dict[str, Any]:
        """Keyword arguments of `models.load_model` for this stage's models."""
        return {
            "dtype": self.dtype or default_dtype(trainable),
            "attn_implementation": self.attn_implementation or None,
            "trust_remote_code": self.trust_remote_code,
            "revision": self.model_revision,
        }


DTYPES = ("auto", "float32", "bfloat16", "float16")


def default_dtype(trainable: bool) -> str:
    """float32 for trained weights (TRL loads them so and autocasts); bf16 for frozen ones where the GPU has it."""
    if trainable:
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


@dataclass
class Stage:
    """One parsed stage: its own keys, the trainer config keys, and where it came from."""

    path: Path | None  # the stage file (None: a stage given on the command line alone)
    config: StageConfig
    trainer_kwargs: dict[str, Any]
    variables: dict[str, str] = field(default_factory=dict)  # the recipe variables it was parsed with
    overrides: dict[str, Any] = field(default_factory=dict)  # the command line's --key value pairs (grids pass them on)
    given: set[str] = field(default_factory=set)  # the keys the file and command line set (defaults are not given)
    record: dict[str, Any] | None = None  # stage.json of this run (set by the recipe runner)

    @property
    def name(self) -> str:
        return self.path.stem if self.path is not None else self.config.stage

    def resolved(self) -> dict[str, Any]:
        """Every key of the stage as it will run: its own keys and the trainer config keys given."""
        from dataclasses import asdict

        return {**asdict(self.config), **self.trainer_kwargs}


@dataclass
class StageContext:
    """What a stage's `run` gets besides the stage: whether to redo it, and (for a grid) how to run a sub-recipe."""

    overwrite: bool = False  # discard a finished or partial output of this stage and redo it
    sub_recipes: Any = None  # recipes.SubRecipes, set by the recipe runner: a grid runs its sub-recipe through it


def is_complete(out_dir: str | Path) -> bool:
    return (Path(out_dir) / DONE_FILE).exists()


def is_ours(folder: str | Path) -> bool:
    """A folder tokentrain wrote: it carries the completion marker or a stage record."""
    folder = Path(folder)
    return (folder / DONE_FILE).exists() or (folder / provenance.RECORD_FILE).exists()


def check_output_dir(out_dir: str | Path, overwrite: bool = False) -> None:
    """Before any compute: `out_dir` must be absent, or a tokentrain output (which only `overwrite` may replace)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out} is a file: choose a folder name")
    if out.exists() and not is_ours(out):
        raise FileExistsError(
            f"output_dir {out} exists and was not written by tokentrain (no {DONE_FILE} or stage.json in it): "
            "tokentrain never deletes such a folder; choose another output_dir or move it away"
        )
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a finished output; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_output(
    out_dir: str | Path, overwrite: bool = False, keep_partial: bool = False, record: dict[str, Any] | None = None
) -> Iterator[Path]:
    """Write a stage's output to `<out>.tmp/`, then rename it to `<out>/` with `_COMPLETE` (and `record` as
    stage.json, with a new run_id).

    A run killed inside the block leaves only `<out>.tmp/`. The next attempt deletes it, or, with `keep_partial`
    (training and generate stages), keeps it so that the work resumes where it stopped, but only when the partial
    work was started with the same resolved config (its stage.json): otherwise it stops naming the changed keys, and
    `overwrite` discards the partial work. A partial started on inputs that were redone since is discarded. A finished
    output is refused unless `overwrite`. With several processes, the main process owns the folders.
    """
    state = distributed_state()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    check_output_dir(out_dir, overwrite)
    if state.is_main_process:
        if tmp.exists():
            _reuse_or_clear_partial(tmp, overwrite, keep_partial, record)
        tmp.mkdir(parents=True, exist_ok=True)
        if record is not None:
            provenance.write_record(tmp, record)
    state.wait_for_everyone()
    yield tmp
    state.wait_for_everyone()
    if state.is_main_process:
        if record is not None:
            provenance.write_record(tmp, provenance.finish_record(record))
        (tmp / DONE_FILE).write_text("complete\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)  # ours: check_output_dir refused anything else
        os.replace(tmp, out_dir)
    state.wait_for_everyone()


def _reuse_or_clear_partial(tmp: Path, overwrite: bool, keep_partial: bool, record: dict[str, Any] | None) -> None:
    old = provenance.read_record(tmp)
    if {p.name for p in tmp.iterdir()} <= {provenance.RECORD_FILE}:  # no work in it yet (e.g. a bad key stopped it)
        shutil.rmtree(tmp)
        return
    if not overwrite and keep_partial:
        if record is None or old is None:
            if any(tmp.iterdir()) and record is not None:
                raise FileExistsError(
                    f"{tmp} holds partial work with no stage.json (an older tokentrain, or not tokentrain's): "
                    "its settings cannot be checked; pass --overwrite to discard it"
                )
            return
        diff = provenance.compare(old, record)
        if diff.identical:
            return
        if not diff.only_stale:
            raise FileExistsError(
                f"{tmp} holds partial work started with other settings ({diff.describe()}); resuming would mix two "
                "runs: restore the settings, or pass --overwrite to discard it and start again"
            )
        logger.info("%s: partial work read inputs that were redone since (%s): starting again", tmp, diff.describe())
    shutil.rmtree(tmp)


def stage_output(stage: Stage, ctx: StageContext, keep_partial: bool = False):
    """`atomic_output` for `stage`'s output_dir, with its record."""
    return atomic_output(stage.config.output_dir, ctx.overwrite, keep_partial, stage.record)


def load_stage_rows(cfg: RowsStage):
    """The stage's rows: `dataset` (file, folder or hub name) with the prompt/completion templates applied.

    Dataset caching is turned off for the stage's process: `map` on a saved dataset would otherwise write its cache
    files into that folder, a finished (and fingerprinted) stage output; with caching off they go to a temporary
    folder that `datasets` deletes."""
    import datasets

    from ..data import apply_templates, load_rows

    datasets.disable_caching()
    rows = load_rows(cfg.dataset, cfg.dataset_split, cfg.dataset_config or None)
    return apply_templates(rows, cfg.prompt_template, cfg.completion_template)


def require(stage: Stage, *keys: str, why: str = "") -> None:
    """Each of `keys` must be set (non-empty), else a ConfigError naming the stage and the key."""
    missing = [k for k in keys if not getattr(stage.config, k)]
    if missing:
        raise ConfigError(f"{stage.name}: {stage.config.stage} needs {', '.join(missing)}{' ' + why if why else ''}")
