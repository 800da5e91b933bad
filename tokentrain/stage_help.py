"""`tokentrain <stage> --help`: every key a stage kind accepts, its own (with their TRL aliases) and its trainer
config's, built from the dataclasses with transformers' HfArgumentParser. Imported only for a stage's --help (it
loads TRL's config classes)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

from .config import parse_override_args
from .stages import STAGES, VARIANTS, config_class


def stage_help(kind: str, argv: list[str]) -> str:
    """The keys of a stage kind (its own, with their TRL aliases) and of its trainer config, from the dataclasses
    through transformers' HfArgumentParser, with help text and defaults."""
    import yaml
    from transformers import HfArgumentParser

    rest = [a for a in argv if a not in ("--help", "-h")]
    file = rest.pop(0) if rest and not rest[0].startswith("-") else None
    if "--config" in rest[:-1]:
        i = rest.index("--config")
        file = rest[i + 1]
        del rest[i : i + 2]
    given = yaml.safe_load(Path(file).read_text()) or {} if file and Path(file).is_file() else {}
    given.update(parse_override_args(rest))
    cls = config_class(kind, given)  # a variant (score's --signal, evaluate's --task) has keys of its own
    fields = {f for f in cls.__dataclass_fields__}
    cfg = cls(**{k: v for k, v in given.items() if k in ("stage", "objective") and k in fields})
    trainer = cfg.trainer_config_class()
    usage = f"tokentrain {kind} [STAGE.yaml | --config STAGE.yaml] [--run_dir DIR] [--overwrite] [--key value ...]"
    parser = HfArgumentParser([], prog=f"tokentrain {kind}", usage=usage, add_help=False)
    parser.description = (
        f"{STAGES[kind][1]}.\n\nThe stage file's keys and the command line's (which win) are the keys below; "
        "TRL/alignment-handbook names (shown as aliases) are accepted."
        + (f"\nObjective {cfg.objective!r}: --objective NAME --help shows another's keys." if kind == "train" else "")
        + (_variants_note(kind, given) if kind in VARIANTS else "")
    )
    parser.formatter_class = _HelpFormatter
    own = _help_class(cls, f"stage keys ({kind})", exclude={"stage"})
    parser._add_dataclass_arguments(own)
    if trainer is not None:
        keys = {f.name for f in dataclasses.fields(own)}
        parser._add_dataclass_arguments(_help_class(trainer, f"{trainer.__name__} keys (the trainer config)", keys))
    return parser.format_help()


def _variants_note(kind: str, given: dict) -> str:
    key, default, table = VARIANTS[kind]
    return f"\n{key} {given.get(key) or default!r}: --{key} VALUE --help shows another's keys ({', '.join(table)})."


def _help_class(cls, title: str, exclude: set[str]):
    """A copy of dataclass `cls` for the help: the fields a class declares before those it inherits (an objective's
    own keys first, TrainingArguments' last), without `exclude`, titled `title`."""
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in exclude}
    order = []
    for klass in cls.__mro__:
        order += [name for name in getattr(klass, "__annotations__", {}) if name in by_name and name not in order]
    fields = []
    for name in order:
        f = by_name[name]
        metadata = dict(f.metadata)
        if "help" in metadata:  # argparse %-formats help texts: a literal % (e.g. "index % 4") must be doubled
            metadata["help"] = re.sub(r"%(?!%|\()", "%%", metadata["help"])
        fields.append(
            (
                name,
                hints[name],
                dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=metadata),
            )
        )
    out = dataclasses.make_dataclass(cls.__name__, fields)
    out._argument_group_name = title
    return out


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's line breaks and show every key's default."""
