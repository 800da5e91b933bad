"""STAGES: stage kind -> (module, one-line help). Each module holds its config dataclass `Config` beside `run`.

    run(stage: Stage, ctx: StageContext) -> None

A new kind of stage is one module here and one line below. Some kinds have variants whose keys differ, chosen by one
key of the stage (VARIANTS): `score` by its `signal`, `prepare`, `evaluate` and `generate` by their `task`; each variant is a
module of its own, so a new signal or task is a new module and one line here. Modules are imported on first use, so
listing the kinds (`tokentrain --help`) imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Any

STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("prepare", "make a task's data and the tiny model with its tokenizer trained in code"),
    "sft": ("train", "supervised fine-tuning with TRL's SFTTrainer (the baseline; also pos/neg/reference models)"),
    "train": ("train", "train with a token-level objective (--objective weighted_ntp, critical_dpo, ...)"),
    "generate": ("generate", "sample completions (graded chains and pairs, or a model's own answers)"),
    "score": ("score", "run frozen models over a dataset once and store token-aligned signal columns"),
    "evaluate": ("evaluate", "evaluate models on a task's rows; writes eval.json and prints a table"),
    "grid": ("grid", "run a sub-recipe once per combination of variables (seeds, learning rates)"),
    "report": ("report", "aggregate a grid's outputs into a table"),
}

# kind -> (key, its default, {value: module}): the module of a stage is the one its value of `key` names.
VARIANTS: dict[str, tuple[str, str, dict[str, str]]] = {
    "prepare": (
        "task",
        "e2e",
        {
            "e2e": "prepare",
            "e2e_synthetic": "prepare",
            "arith_chain": "prepare",
            "unlearning_synthetic": "prepare_unlearning",
            "unlearning_mini": "prepare_unlearning",
            "tofu": "prepare_unlearning",
            "text_blocks": "prepare_unlearning",
            "keyword_length": "prepare_keyword_length",
            "chat_preferences": "prepare_chat_preferences",
            "gsm8k_equations": "prepare_equations",
            "synthetic_equations": "prepare_equations",
        },
    ),
    "score": (
        "signal",
        "ref_logps",
        {
            "ref_logps": "score",
            "contrastive": "score",
            "whp_labels": "score_whp_labels",
            "aligndistil_alpha": "score_aligndistil",
        },
    ),
    "evaluate": (
        "task",
        "e2e",
        {
            "e2e": "evaluate",
            "gsm8k": "evaluate",
            "math": "evaluate",
            "arithmetic": "evaluate",
            "tofu": "evaluate_tofu",
            "familiarity": "evaluate_familiarity",
            "keyword_length": "evaluate_aligndistil",
            "generations": "evaluate_aligndistil",
            "concept_heads": "evaluate_concept_heads",
        },
    ),
    "generate": (
        "task",
        "gsm8k",
        {
            "gsm8k": "generate",
            "math": "generate",
            "arithmetic": "generate",
            "self_distill": "generate_self_distill",
        },
    ),
}


def stage_module(kind: str, values: dict[str, Any] | None = None):
    """The module of a stage kind (its `Config` and `run`); `values`: the stage's keys, which pick a variant. An unknown
    kind or variant is a ValueError listing the known ones."""
    if kind not in STAGES:
        raise ValueError(f"'stage' must be one of {sorted(STAGES)}, got {kind!r}")
    name = STAGES[kind][0]
    if kind in VARIANTS:
        key, default, table = VARIANTS[kind]
        value = (values or {}).get(key) or default
        if value not in table:
            raise ValueError(f"{kind}: {key} must be one of {sorted(table)}, got {value!r}")
        name = table[value]
    return importlib.import_module(f"{__name__}.{name}")


def config_class(kind: str, values: dict[str, Any] | None = None):
    module = stage_module(kind, values)
    return module.CONFIGS[kind] if hasattr(module, "CONFIGS") else module.Config
