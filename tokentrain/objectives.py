"""OBJECTIVES: the one registry, objective stem -> (module, config class, trainer class), imported on first use.

A new objective is one line here (DESIGN.md). Importing this module imports nothing heavy: `tokentrain --help` lists
the stems without loading torch or TRL.
"""

from __future__ import annotations

import importlib

OBJECTIVES: dict[str, tuple[str, str, str]] = {
    "weighted_ntp": ("tokentrain.trainers.weighted_ntp", "WeightedNTPConfig", "WeightedNTPTrainer"),
    "critical_dpo": ("tokentrain.trainers.critical_dpo", "CriticalDPOConfig", "CriticalDPOTrainer"),
    "concept_heads": ("tokentrain.trainers.concept_heads", "ConceptHeadsConfig", "ConceptHeadsTrainer"),
    "aligndistil": ("tokentrain.trainers.aligndistil", "AlignDistilConfig", "AlignDistilTrainer"),
    "unlearning": ("tokentrain.trainers.unlearning", "UnlearningConfig", "UnlearningTrainer"),
}

# TRL's own trainers, for `stage: train` with a TRL or alignment-handbook YAML (`objective: sft` or `dpo`) and for
# the baselines of the recipes. Not token-level objectives: the per-objective tests and benchmarks skip them.
BASELINES: dict[str, tuple[str, str, str]] = {
    "sft": ("trl", "SFTConfig", "SFTTrainer"),
    "dpo": ("trl", "DPOConfig", "DPOTrainer"),
}


def objective(stem: str) -> tuple[type, type]:
    """(config class, trainer class) of `stem`; an unknown stem is a ValueError listing the known ones."""
    known = {**OBJECTIVES, **BASELINES}
    if stem not in known:
        raise ValueError(
            f"objective {stem!r} is unknown; valid: {sorted(OBJECTIVES)} or the TRL baselines {sorted(BASELINES)}"
        )
    module, config, trainer = known[stem]
    mod = importlib.import_module(module)
    return getattr(mod, config), getattr(mod, trainer)
