"""What made a stage output: `stage.json`, the resolved config and a fingerprint of every input, and how two differ.

A stage output is identical work only if it was made with the same resolved config from the same inputs. Inputs are
found, not declared: every string value of the config that names an existing path. A path inside a finished
tokentrain output is fingerprinted by that output's `run_id` (new each time a stage completes), so a redone upstream
stage makes its consumers *stale*; any other file is fingerprinted by its content (its size and mtime past 64 MiB), a
folder by the fingerprints of its files. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__

RECORD_FILE = "stage.json"
FORMAT = "tokentrain.stage"

# Trainer keys that change what is logged or uploaded, never the output: a rerun that only changes them is identical.
COSMETIC_KEYS = frozenset(
    {
        "logging_steps",
        "logging_first_step",
        "logging_strategy",
        "logging_dir",
        "logging_nan_inf_filter",
        "report_to",
        "run_name",
        "project",
        "trackio_space_id",
        "disable_tqdm",
        "log_level",
        "log_level_replica",
        "log_on_each_node",
        "push_to_hub",
        "hub_model_id",
        "hub_strategy",
        "hub_token",
        "hub_private_repo",
        "dataloader_num_workers",
        "save_total_limit",
    }
)

_HASH_LIMIT = 64 * 2**20  # files up to 64 MiB are hashed; larger ones (weights) are identified by size and mtime
_MAX_FILES = 10_000


def read_record(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def write_record(folder: Path, record: dict[str, Any]) -> None:
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def finish_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record of a completed output: a new `run_id`, by which its consumers know which run they read."""
    return {**record, "run_id": uuid.uuid4().hex, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}


def owning_output(path: Path) -> Path | None:
    """The finished tokentrain output holding `path` (itself or the nearest parent with a finished stage.json)."""
    for folder in (path, *path.parents):
        record = read_record(folder)
        if record is not None and record.get("run_id"):
            return folder
        if folder.parent == folder:
            break
    return None


def fingerprint(path: Path) -> dict[str, Any]:
    """How to tell later whether `path` is still what a stage read."""
    owner = owning_output(path.resolve())
    if owner is not None:
        rel = str(path.resolve().relative_to(owner))
        return {"output": str(owner), "path": rel, "run_id": read_record(owner)["run_id"]}
    if path.is_file():
        return {"file": _file_digest(path)}
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file())
    for p in files[:_MAX_FILES]:
        digest.update(f"{p.relative_to(path)}\0{_file_digest(p)}\0".encode())
    return {"folder": digest.hexdigest(), "files": len(files)}


def _file_digest(path: Path) -> str:
    stat = path.stat()
    if stat.st_size > _HASH_LIMIT:
        return f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_paths(config: dict[str, Any], output_dir: str) -> list[str]:
    """Every string value (nested in dicts and lists too) naming an existing path outside the stage's own output."""
    out = Path(output_dir).resolve() if output_dir else None
    found: list[str] = []

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and value and len(value) < 4096 and "\n" not in value:
            path = Path(value)
            try:
                exists = path.exists()
            except OSError:
                return
            if not exists or value in found:
                return
            resolved = path.resolve()
            if out is not None and (resolved == out or out in resolved.parents or resolved in out.parents):
                return  # the output itself, something inside it, or a folder above it (e.g. run_dir)
            found.append(value)

    walk(config)
    return found


def stage_record(name: str, kind: str, config: dict[str, Any], not_inputs: tuple[str, ...] = ()) -> dict[str, Any]:
    """The record of a stage about to run: its resolved config and the fingerprint of each input (the values of the
    keys in `not_inputs` are not inputs: a grid's sub-recipe is checked stage by stage instead)."""
    scanned = {k: v for k, v in config.items() if k not in not_inputs}
    inputs = {p: fingerprint(Path(p)) for p in input_paths(scanned, config.get("output_dir", ""))}
    return {
        "format": FORMAT,
        "version": 1,
        "stage": name,
        "kind": kind,
        "config": config,
        "inputs": inputs,
        "tokentrain": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


@dataclass
class RecordDiff:
    """How a recorded output differs from the stage about to run."""

    config: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (then, now)
    changed_inputs: list[str] = field(default_factory=list)  # user files that changed, or inputs added/removed
    stale_inputs: list[str] = field(default_factory=list)  # tokentrain outputs redone since

    @property
    def identical(self) -> bool:
        return not (self.config or self.changed_inputs or self.stale_inputs)

    @property
    def only_stale(self) -> bool:
        return bool(self.stale_inputs) and not (self.config or self.changed_inputs)

    def describe(self) -> str:
        parts = [f"{k}: {then!r} then, {now!r} now" for k, (then, now) in self.config.items()]
        parts += [f"input {p} changed" for p in self.changed_inputs]
        parts += [f"input {p} was redone" for p in self.stale_inputs]
        return "; ".join(parts)


def compare(old: dict[str, Any], new: dict[str, Any]) -> RecordDiff:
    diff = RecordDiff()
    then, now = _canonical(old.get("config", {})), _canonical(new.get("config", {}))
    for key in sorted(set(then) | set(now)):
        if key not in COSMETIC_KEYS and then.get(key, _MISSING) != now.get(key, _MISSING):
            diff.config[key] = (then.get(key, "<unset>"), now.get(key, "<unset>"))
    old_in, new_in = old.get("inputs", {}), new.get("inputs", {})
    for path in sorted(set(old_in) | set(new_in)):
        a, b = old_in.get(path), new_in.get(path)
        if a == b:
            continue
        if a and b and "run_id" in a and "run_id" in b and a.get("output") == b.get("output"):
            diff.stale_inputs.append(path)
        else:
            diff.changed_inputs.append(path)
    return diff


_MISSING = object()


def _canonical(config: dict[str, Any]) -> dict[str, Any]:
    """JSON round trip: tuples become lists and keys strings, as they are in a record read back from disk."""
    return json.loads(json.dumps(config, sort_keys=True, default=str))
