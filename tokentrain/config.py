"""Stage YAML -> config dataclasses. Unknown keys and wrong types are errors that name the key; `--key value`
overrides are typed by the field they set; TRL and alignment-handbook key names are accepted.

A recipe is a folder of numbered stage files (`01_sft_ref.yaml`, `02_score.yaml`, ...). Each file is flat: `stage`
names the kind, the stage's own keys configure it (`tokentrain <kind> --help` lists them), and every other key must
be a field of the stage's trainer config (`SFTConfig`, `WeightedNTPConfig`, ...). String values may use `{run_dir}`
(the recipe's output folder, `--run_dir`), `{data_dir}` (the shared data folder, `--data_dir` or $TOKENTRAIN_DATA)
and the recipe's own variables (`variables.yaml`); inside a `grid` stage's sub-recipe also the grid's variables
(`{seed}`, `{lr}`, ...). Other braces (`{question}` in a row template) are left alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .stages import STAGES, config_class
from .stages.base import RENAMED_TRAINER_KEYS, ConfigError, Stage

__all__ = ["ConfigError", "Stage", "load_stage", "stage_from_mapping", "coerce", "parse_override_args"]


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert `value` (YAML or a CLI string) to `annotation`, or raise ConfigError naming the key.

    YAML null (and the string "null") is None for an optional key; the string "none" is None only where the key takes
    no string, so TRL's `report_to: none` stays the string TRL expects.
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if type(None) in args and (
            value is None
            or (isinstance(value, str) and value.lower() == "null")
            or (isinstance(value, str) and value.lower() == "none" and str not in args)
        ):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
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
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"key {key!r}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"key {key!r}: expected an integer, got {value!r}")
        return out
    if annotation is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"key {key!r}: expected a string, got {value!r}")
        return str(value)
    if origin in (list, dict) or annotation in (list, dict):
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"key {key!r}: expected a {(origin or annotation).__name__}, got {value!r}") from None
        want = origin or annotation
        if not isinstance(value, want):
            raise ConfigError(f"key {key!r}: expected a {want.__name__}, got {value!r}")
        return value
    return value  # enums and other types: the config's own __post_init__ validates


def parse_override_args(argv: list[str]) -> dict[str, str]:
    """`--key value` pairs (and `--key=value`) -> dict of strings; a bare `--flag` means true. `--<stage>.<key>`
    (a scoped override) keeps its dot."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 1
        else:
            value = "true"
        scope, dot, name = key.rpartition(".")
        key = f"{scope}{dot}{name.replace('-', '_')}"
        if key in out:
            raise ConfigError(f"--{key} is given twice ({out[key]!r} and {value!r})")
        out[key] = value
        i += 1
    return out


def aliases(cls) -> dict[str, str]:
    """TRL / alignment-handbook name -> tokentrain key, from the `aliases` metadata of the stage's fields."""
    out = {}
    for f in dataclasses.fields(cls):
        for alias in f.metadata.get("aliases", ()):
            out[alias.lstrip("-")] = f.name
    return out


def resolve_aliases(values: dict[str, Any], cls, where: str) -> dict[str, Any]:
    """Rename TRL/handbook keys to tokentrain's; a key given under both names with different values is an error."""
    names = aliases(cls)
    out = {k: v for k, v in values.items() if k not in names}
    for alias, key in names.items():
        if alias not in values:
            continue
        if key in values and values[key] != values[alias]:
            raise ConfigError(
                f"{where}: {key!r} and its TRL name {alias!r} are both given, with different values "
                f"({values[key]!r} and {values[alias]!r}): keep one"
            )
        out[key] = values[alias]
    return out


def load_stage(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    variables: dict[str, str] | None = None,
    strict: bool = True,
    kind: str | None = None,
) -> Stage:
    """Parse a stage YAML; `overrides` win over the file, `kind` (the command's stage kind) over its `stage` key.

    With `strict=False` (a recipe's shared overrides), override keys the stage does not know are ignored rather than
    errors; keys written in the file are always checked.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: give a stage YAML file (or run the folder with `tokentrain run`)")
    if not path.is_file():
        raise ConfigError(f"stage file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
    return stage_from_mapping(raw, path, overrides, variables, strict, kind)


def stage_from_mapping(
    raw: dict[str, Any],
    path: Path | None,
    overrides: dict[str, Any] | None = None,
    variables: dict[str, str] | None = None,
    strict: bool = True,
    kind: str | None = None,
) -> Stage:
    """A stage from its keys (`path` None: a stage given on the command line alone, named after its kind)."""
    where = str(path) if path is not None else f"tokentrain {kind}"
    overrides = dict(overrides or {})
    kind = kind or overrides.pop("stage", None) or raw.get("stage")
    if raw.get("stage") not in (None, kind):
        raise ConfigError(f"{where}: the file is a {raw.get('stage')!r} stage, not {kind!r}")
    if kind not in STAGES:
        raise ConfigError(f"{where}: 'stage' must be one of {sorted(STAGES)}, got {kind!r}")
    try:
        stage_cls = config_class(kind, {**raw, **overrides})  # a variant (score's signal, evaluate's task) decides
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    raw = resolve_aliases({k: v for k, v in raw.items() if k != "stage"}, stage_cls, where)
    overrides = resolve_aliases(overrides, stage_cls, "command line")
    for pair in RENAMED_TRAINER_KEYS:  # `--gradient_checkpointing false` wins over a file's activation_checkpointing
        if any(k in overrides for k in pair):
            raw = {k: v for k, v in raw.items() if k not in pair}
    values = {**raw, **overrides, "stage": kind}
    stage_fields = {f.name for f in dataclasses.fields(stage_cls)}
    hints = _hints(stage_cls)
    variables = variables or {}
    name = path.name if path is not None else kind

    def expand(v, key):
        if isinstance(v, str):
            return _expand(v, variables, f"{name}:{key}", strict="template" not in key)
        if isinstance(v, dict):
            return {k: expand(x, key) for k, x in v.items()}
        if isinstance(v, list):
            return [expand(x, key) for x in v]
        return v

    stage_values = {k: coerce(expand(v, k), hints[k], f"{name}:{k}") for k, v in values.items() if k in stage_fields}
    config = stage_cls(**stage_values)
    for f in dataclasses.fields(config):  # defaults name variables too (e.g. `data_dir: "{data_dir}"`)
        value = getattr(config, f.name)
        if f.name not in stage_values and isinstance(value, str) and "{" in value:
            setattr(config, f.name, expand(value, f.name))
    if config.output_dir and variables.get("run_dir") and not Path(config.output_dir).is_absolute():
        config.output_dir = str(Path(variables["run_dir"]) / config.output_dir)

    trainer_cls = config.trainer_config_class()
    trainer_hints = _hints(trainer_cls) if trainer_cls else {}
    trainer_kwargs = {}
    for k, v in values.items():
        if k in stage_fields:
            continue
        if k not in trainer_hints:
            if not strict and k in overrides and k not in raw:
                continue
            valid = sorted(stage_fields)
            close = difflib.get_close_matches(k, list(stage_fields) + list(trainer_hints), n=3)
            where_else = f"fields of {trainer_cls.__name__}" if trainer_cls else "nothing else"
            raise ConfigError(
                f"{where}: unknown key {k!r}"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + f". Valid keys: the stage keys {valid}, and {where_else} (`tokentrain {kind} --help` lists them)."
            )
        trainer_kwargs[k] = coerce(expand(v, k), trainer_hints[k], f"{name}:{k}")
    given = {k for k in values if k in stage_fields or k in trainer_kwargs} - {"stage"}
    return Stage(
        path=path,
        config=config,
        trainer_kwargs=trainer_kwargs,
        variables=dict(variables),
        overrides=dict(overrides),
        given=given,
    )


def accepted_keys(kind: str, trainer_cls=None, values: dict[str, Any] | None = None) -> set[str]:
    """Every key a stage of `kind` (and variant, from `values`) accepts: its own, their TRL aliases, and its trainer
    config's fields."""
    stage_cls = config_class(kind, values)
    keys = {f.name for f in dataclasses.fields(stage_cls)} | set(aliases(stage_cls))
    if trainer_cls is not None:
        keys |= {f.name for f in dataclasses.fields(trainer_cls)}
    return keys


_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Braces that are row templates, not recipe variables: a recipe variable is a known name or one of these.
RESERVED_VARIABLES = ("run_dir", "data_dir", "top_dir", "parent_dir", "recipe_dir")


def _expand(value: str, variables: dict[str, str], where: str, strict: bool = True) -> str:
    """Replace `{name}` for the recipe's variables. With `strict` (every key but row and chat templates), an unknown
    name in a value that looks like a path (contains '/' and no space) or is a whole `{name}` is an error: it would
    otherwise become a folder literally named `{name}`."""

    def sub(m):
        name = m.group(1)
        if name in variables:
            return str(variables[name])
        if name in RESERVED_VARIABLES:
            raise ConfigError(f"{where}: uses {{{name}}} but it is not set here; known: {sorted(variables)}")
        return m.group(0)

    out = _VARIABLE.sub(sub, value)
    left = _VARIABLE.findall(out)
    if strict and left and (out.strip() == "{" + left[0] + "}" or ("/" in out and " " not in out and "\n" not in out)):
        raise ConfigError(
            f"{where}: {value!r} names the variable(s) {sorted(set(left))}, which are not set (known: "
            f"{sorted(variables)}); set them in the recipe's variables.yaml or with --<name> on the command line"
        )
    return out


VARIABLES_FILE = "variables.yaml"


def recipe_variables(recipe: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """The recipe's own variables: `variables.yaml` beside its stage files (name -> default, e.g. `model:
    Qwen/Qwen2.5-1.5B`), each replaced by a command-line override of the same name (`--model ...`). Stages use them
    as `{model}`, so one override reaches every stage that names the model, whatever key holds it. A default may name
    `{recipe_dir}`, this recipe's folder (`terms: "{recipe_dir}/../alice_terms.yaml"`)."""
    path = Path(recipe) / VARIABLES_FILE
    if not Path(recipe).is_dir() or not path.exists():
        return {}
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not all(isinstance(v, (str, int, float, bool)) for v in raw.values()):
        raise ConfigError(f"{path}: must map variable names to single values, got {raw!r}")
    reserved = set(RESERVED_VARIABLES) & set(raw)
    if reserved:
        raise ConfigError(f"{path}: {sorted(reserved)} are set by tokentrain, not by a recipe")
    overrides = overrides or {}
    here = str(Path(recipe).resolve())  # `{recipe_dir}` in a default: a file beside the recipe, wherever the run starts
    return {
        k: str(overrides[k])
        if k in overrides
        else os.path.normpath(v.replace("{recipe_dir}", here))
        if isinstance(v, str) and "{recipe_dir}" in v
        else str(v)
        for k, v in raw.items()
    }


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
