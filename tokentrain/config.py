"""Recipe YAML -> config dataclasses. Unknown keys and wrong types are errors that name the key; `--key value`
overrides are typed by the field they set.

A recipe is a folder of numbered stage files (`01_sft_ref.yaml`, `02_score.yaml`, ...). Each file is flat: `stage`
names the command, the stage's own keys (below) configure it, and every other key must be a field of the stage's
trainer config (`SFTConfig`, `WeightedNTPConfig`, ...). String values may use `{run_dir}` (the recipe's output
folder, `--run_dir`) and `{data_dir}` (the shared data folder, `--data_dir` or $TOKENTRAIN_DATA); inside a `grid`
stage's sub-recipe also the grid's variables (`{seed}`, `{lr}`, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe key, value or type is wrong; the message names the file and key."""


@dataclass
class StageConfig:
    """Keys common to every stage."""

    stage: str = field(metadata={"help": "Command: prepare, sft, train, generate, score, evaluate, grid or report."})
    output_dir: str = field(default="", metadata={"help": "Output folder (relative paths are under run_dir)."})
    seed: int = field(default=0, metadata={"help": "Random seed of the stage."})


@dataclass
class PrepareStage(StageConfig):
    task: str = field(
        default="e2e",
        metadata={"help": "'e2e' (../shared/data/e2e), 'e2e_synthetic' or 'arith_chain' (both made in code)."},
    )
    data_dir: str = field(default="{data_dir}", metadata={"help": "Folder of the shared data (task 'e2e')."})
    num_rows: int = field(default=2000, metadata={"help": "Rows generated for 'e2e_synthetic'."})
    vocab_size: int = field(default=512, metadata={"help": "Vocabulary of the tokenizer trained in code."})
    splits: dict = field(
        default_factory=dict,
        metadata={"help": "arith_chain: file name -> [rows, seed], e.g. {pool: [50000, 0], dev: [200, 777]}."},
    )


@dataclass
class RowsStage(StageConfig):
    """Keys of the stages that read rows: where they come from and how prompt/completion are built."""

    dataset: str = field(default="", metadata={"help": "Rows: a jsonl/json/csv file, a stage folder or a hub name."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    dataset_config: str = field(default="", metadata={"help": "Config name of a hub dataset (e.g. 'main')."})
    prompt_template: str = field(
        default="", metadata={"help": "Build `prompt` from each row's columns, e.g. 'Question: {question}\\nAnswer:'."}
    )
    completion_template: str = field(
        default="", metadata={"help": "Build `completion` from each row's columns, e.g. ' {answer}'."}
    )


@dataclass
class SFTStage(RowsStage):
    model: str = field(default="", metadata={"help": "Hub name or folder of the model to train."})
    drop_prompt: bool = field(
        default=False, metadata={"help": "Train on [BOS] + completion alone (PRIOR's text-only reference)."}
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains every weight."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "LoRA target modules: 'all-linear' or a comma-separated list."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    eval_holdout: int = field(
        default=0,
        metadata={
            "help": "Hold out the last N rows as the eval set (with eval_strategy, load_best_model_at_end: the best "
            "checkpoint is the one saved)."
        },
    )
    stop_dataset: str = field(
        default="", metadata={"help": "Rows graded greedily during training (with stop_task) to stop early."}
    )
    stop_task: str = field(default="", metadata={"help": "Grader of stop_dataset: gsm8k, math or arithmetic."})
    stop_accuracy: float = field(
        default=0.0, metadata={"help": "Stop training at the first check with this greedy accuracy or more."}
    )
    stop_check_from: int = field(default=0, metadata={"help": "First step at which the accuracy is checked."})
    stop_check_every: int = field(default=25, metadata={"help": "Steps between accuracy checks."})
    stop_max_new_tokens: int = field(default=64, metadata={"help": "Greedy decoding budget of the checks."})


@dataclass
class TrainStage(SFTStage):
    objective: str = field(default="weighted_ntp", metadata={"help": "Objective stem (see `tokentrain --help`)."})


@dataclass
class GenerateStage(RowsStage):
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
    dtype: str = field(default="auto", metadata={"help": "Model weights dtype: auto, float32 or bfloat16."})


@dataclass
class ScoreStage(RowsStage):
    signal: str = field(default="ref_logps", metadata={"help": "Signal to compute: ref_logps or contrastive."})
    model: str = field(default="", metadata={"help": "ref_logps: the frozen reference model (hub name or folder)."})
    pos_model: str = field(default="", metadata={"help": "contrastive: the positive model (folder or adapter)."})
    neg_model: str = field(default="", metadata={"help": "contrastive: the negative model (folder or adapter)."})
    ce_beta: float = field(default=1.0, metadata={"help": "contrastive: b in (1+b)·z⁺ − b·z⁻."})
    score_chosen: bool = field(default=False, metadata={"help": "contrastive: also write chosen_weights (s_t)."})
    chunk_size: int = field(default=1024, metadata={"help": "contrastive: positions projected to logits at once."})
    max_prompt_length: int = field(default=512, metadata={"help": "contrastive: drop rows with a longer prompt."})
    max_length: int = field(default=1024, metadata={"help": "contrastive: drop rows with longer prompt+completion."})
    tokenizer: str = field(default="", metadata={"help": "The policy's tokenizer (default: the reference's)."})
    drop_prompt: bool = field(default=False, metadata={"help": "Score completions seen after [BOS] alone."})
    batch_size: int = field(default=16, metadata={"help": "Rows per forward (sorted by length, longest first)."})
    dtype: str = field(default="float32", metadata={"help": "Reference weights dtype: float32 or bfloat16."})


@dataclass
class EvaluateStage(RowsStage):
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
    dtype: str = field(default="auto", metadata={"help": "Model weights dtype: auto, float32 or bfloat16."})


@dataclass
class GridStage(StageConfig):
    recipe: str = field(default="", metadata={"help": "A recipe folder run once per combination of `variables`."})
    variables: dict = field(
        default_factory=dict,
        metadata={"help": "name -> list of values; `{name}` in the sub-recipe is replaced, e.g. {seed: [0, 1, 2]}."},
    )
    workers: int = field(default=1, metadata={"help": "Combinations run at once, each in its own process."})
    threads: int = field(
        default=0, metadata={"help": "torch threads per worker (0: this process's torch threads / workers)."}
    )


@dataclass
class ReportStage(StageConfig):
    report: str = field(default="critical_dpo_mini", metadata={"help": "Which report: critical_dpo_mini."})
    inputs: str = field(default="", metadata={"help": "Folder the report reads (a grid stage's output)."})
    options: dict = field(default_factory=dict, metadata={"help": "Report-specific settings."})


STAGES: dict[str, type[StageConfig]] = {
    "prepare": PrepareStage,
    "sft": SFTStage,
    "train": TrainStage,
    "generate": GenerateStage,
    "score": ScoreStage,
    "evaluate": EvaluateStage,
    "grid": GridStage,
    "report": ReportStage,
}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert `value` (YAML or a CLI string) to `annotation`, or raise ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"key {key!r}: {value!r} fits none of {annotation}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"key {key!r}: expected true/false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"key {key!r}: expected {annotation.__name__}, got {value!r}")
        try:
            out = (
                annotation(value)
                if not isinstance(value, str)
                else annotation(float(value) if annotation is float else int(value))
            )
        except (TypeError, ValueError):
            raise ConfigError(f"key {key!r}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"key {key!r}: expected an integer, got {value!r}")
        return out
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"key {key!r}: expected a string, got {value!r}")
        return str(value)
    if origin in (list, dict) or annotation in (list, dict):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        want = origin or annotation
        if not isinstance(value, want):
            raise ConfigError(f"key {key!r}: expected a {want.__name__}, got {value!r}")
        return value
    return value  # enums and other types: the config's own __post_init__ validates


def parse_override_args(argv: list[str]) -> dict[str, str]:
    """`--key value` pairs (and `--key=value`) -> dict of strings; a bare `--flag` means true."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 1
        else:
            value = "true"
        out[key.replace("-", "_")] = value
        i += 1
    return out


def trainer_config_class(stage: StageConfig):
    """The trainer config dataclass whose fields the stage's other keys set (None for stages without a trainer)."""
    if isinstance(stage, TrainStage):
        from .objectives import objective

        try:
            return objective(stage.objective)[0]
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if isinstance(stage, SFTStage):
        from trl import SFTConfig

        return SFTConfig
    return None


@dataclass
class Stage:
    """One parsed stage file: its own keys, the trainer config keys, and where it came from."""

    path: Path
    config: StageConfig
    trainer_kwargs: dict[str, Any]
    variables: dict[str, str] = field(default_factory=dict)  # the recipe variables it was parsed with
    overrides: dict[str, Any] = field(default_factory=dict)  # the command line's --key value pairs (grids pass them on)

    @property
    def name(self) -> str:
        return self.path.stem


def load_stage(
    path: str | Path, overrides: dict[str, Any] | None = None, variables: dict[str, str] | None = None, strict=True
) -> Stage:
    """Parse a stage YAML; `overrides` win over the file. With `strict=False` (a recipe's shared overrides), keys the
    stage does not know are ignored rather than errors."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
    kind = (overrides or {}).get("stage", raw.get("stage"))
    if kind not in STAGES:
        raise ConfigError(f"{path}: 'stage' must be one of {sorted(STAGES)}, got {kind!r}")
    stage_cls = STAGES[kind]
    stage_fields = {f.name for f in dataclasses.fields(stage_cls)}
    hints = _hints(stage_cls)
    values = {**raw, **(overrides or {})}
    variables = variables or {}

    def expand(v):
        if isinstance(v, str):
            # only the recipe's variables: other braces are row templates ({question})
            names = "|".join(map(re.escape, {"run_dir", "data_dir", *variables}))
            return re.sub(r"\{(" + names + r")\}", lambda m: _variable(variables, m.group(1)), v)
        if isinstance(v, dict):
            return {k: expand(x) for k, x in v.items()}
        if isinstance(v, list):
            return [expand(x) for x in v]
        return v

    stage_values = {k: coerce(expand(v), hints[k], f"{path.name}:{k}") for k, v in values.items() if k in stage_fields}
    config = stage_cls(**stage_values)
    if config.output_dir and variables.get("run_dir") and not Path(config.output_dir).is_absolute():
        config.output_dir = str(Path(variables["run_dir"]) / config.output_dir)

    trainer_cls = trainer_config_class(config)
    trainer_hints = _hints(trainer_cls) if trainer_cls else {}
    trainer_kwargs = {}
    for k, v in values.items():
        if k in stage_fields:
            continue
        if k not in trainer_hints:
            if not strict and overrides and k in overrides and k not in raw:
                continue
            valid = sorted(stage_fields)
            close = difflib.get_close_matches(k, list(stage_fields) + list(trainer_hints), n=3)
            where = f"fields of {trainer_cls.__name__}" if trainer_cls else "nothing else"
            raise ConfigError(
                f"{path}: unknown key {k!r}"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + f". Valid keys: the stage keys {valid}, and {where}."
            )
        trainer_kwargs[k] = coerce(expand(v), trainer_hints[k], f"{path.name}:{k}")
    return Stage(
        path=path,
        config=config,
        trainer_kwargs=trainer_kwargs,
        variables=dict(variables),
        overrides=dict(overrides or {}),
    )


def _variable(variables: dict[str, str], name: str) -> str:
    if name not in variables:
        raise ConfigError(f"recipe value uses {{{name}}} but it is not set here; known: {sorted(variables)}")
    return variables[name]


VARIABLES_FILE = "variables.yaml"


def recipe_variables(recipe: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """The recipe's own variables: `variables.yaml` beside its stage files (name -> default, e.g. `model:
    Qwen/Qwen2.5-1.5B`), each replaced by a command-line override of the same name (`--model ...`). Stages use them
    as `{model}`, so one override reaches every stage that names the model, whatever key holds it."""
    path = Path(recipe) / VARIABLES_FILE
    if not Path(recipe).is_dir() or not path.exists():
        return {}
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not all(isinstance(v, (str, int, float, bool)) for v in raw.values()):
        raise ConfigError(f"{path}: must map variable names to single values, got {raw!r}")
    reserved = {"run_dir", "data_dir", "top_dir", "parent_dir"} & set(raw)
    if reserved:
        raise ConfigError(f"{path}: {sorted(reserved)} are set by tokentrain, not by a recipe")
    overrides = overrides or {}
    return {k: str(overrides.get(k, v)) for k, v in raw.items()}


def recipe_stages(recipe: str | Path) -> list[Path]:
    """The numbered stage files of a recipe folder, in order (or a single stage file)."""
    recipe = Path(recipe)
    if recipe.is_file():
        return [recipe]
    if not recipe.is_dir():
        raise ConfigError(f"recipe not found: {recipe}")
    files = sorted(p for p in recipe.glob("[0-9]*.yaml"))
    if not files:
        raise ConfigError(f"{recipe} holds no numbered stage files (01_*.yaml, ...)")
    return files


def default_data_dir() -> str:
    """$TOKENTRAIN_DATA, else ../shared/data beside the checkout (absent in a fresh clone: stages that need it say so)."""
    if os.environ.get("TOKENTRAIN_DATA"):
        return os.environ["TOKENTRAIN_DATA"]
    return str(Path(__file__).resolve().parents[2] / "shared" / "data")
