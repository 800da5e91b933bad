"""OBJECTIVES: the one registry, objective stem -> (module, config class, trainer class), imported on first use.

A new objective is one line here (DESIGN.md). Importing this module imports nothing heavy: `tokentrain --help` lists
the stems without loading torch or TRL.
"""

from __future__ import annotations

import importlib

OBJECTIVES: dict[str, tuple[str, str, str]] = {
    "weighted_ntp": ("tokentrain.trainers.weighted_ntp", "WeightedNTPConfig", "WeightedNTPTrainer"),
    "critical_dpo": ("tokentrain.trainers.critical_dpo", "CriticalDPOConfig", "CriticalDPOTrainer"),
}


def objective(stem: str) -> tuple[type, type]:
    """(config class, trainer class) of `stem`; an unknown stem is a ValueError listing the known ones."""
    if stem not in OBJECTIVES:
        raise ValueError(f"objective {stem!r} is unknown; valid: {sorted(OBJECTIVES)}")
    module, config, trainer = OBJECTIVES[stem]
    mod = importlib.import_module(module)
    return getattr(mod, config), getattr(mod, trainer)
