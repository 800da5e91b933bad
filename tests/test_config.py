"""Recipe YAML -> configs: every shipped recipe parses; bad keys and types are errors naming the key."""

from pathlib import Path

import pytest
import yaml

from tokentrain.config import (
    ConfigError,
    coerce,
    load_stage,
    parse_override_args,
    recipe_stages,
    recipe_variables,
)
from tokentrain.stages import train as train_stage

ROOT = Path(__file__).resolve().parents[1]
RECIPE_ROOTS = (ROOT / "recipes", ROOT / "tokentrain" / "shipped" / "quickstart")  # recipes/quickstart links there
ALL_RECIPES = sorted(
    {p for root in RECIPE_ROOTS for p in root.rglob("*") if p.is_dir() and list(p.glob("[0-9]*.yaml"))}
)
VARS = {"run_dir": "runs/x", "data_dir": "data", "top_dir": "runs/x"}


def _grid_subrecipes():
    subs = set()
    for recipe in ALL_RECIPES:
        for path in recipe_stages(recipe):
            if yaml.safe_load(path.read_text()).get("stage") == "grid":
                subs.add((path.parent / yaml.safe_load(path.read_text())["recipe"]).resolve())
    return subs


# sub-recipes of grid stages are checked through their grid, with the grid's variables
RECIPES = [r for r in ALL_RECIPES if r.resolve() not in _grid_subrecipes()]


def _check_recipe(recipe, variables, seen):
    variables = {**recipe_variables(recipe), **variables}
    for path in recipe_stages(recipe):
        stage = load_stage(path, {}, variables)
        assert stage.config.output_dir.startswith(variables["run_dir"] + "/")
        seen.append(path)
        if stage.config.stage in ("sft", "train"):  # LoRA keys come with use_peft (TRL's switch)
            train_stage._peft_config(stage)
        cls = stage.config.trainer_config_class()
        if cls is not None:  # the trainer config really accepts every key (bf16 off: no GPU here)
            kwargs = {**stage.trainer_kwargs, "bf16": False, "activation_checkpointing": False}
            cls(output_dir="/tmp/unused", **kwargs)
        if stage.config.stage == "grid":  # every stage of the sub-recipe, with the first value of every variable
            combo = {k: str(v[0]) for k, v in stage.config.variables.items()}
            sub_vars = {**variables, **combo, "parent_dir": variables["run_dir"], "run_dir": stage.config.output_dir}
            _check_recipe(path.parent / stage.config.recipe, sub_vars, seen)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipes_parse_and_build_configs(recipe):
    seen = []
    _check_recipe(recipe, VARS, seen)
    assert seen


def test_every_shipped_stage_file_is_checked():
    seen = []
    for recipe in RECIPES:
        _check_recipe(recipe, VARS, seen)
    every = {p.resolve() for r in ALL_RECIPES for p in recipe_stages(r)}
    assert every == {p.resolve() for p in seen}


def write(tmp_path, text):
    path = tmp_path / "01_stage.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_it_and_suggests(tmp_path):
    path = write(tmp_path, "stage: train\nweighting: prior\nlearnig_rate: 1.0e-3\noutput_dir: o\n")
    with pytest.raises(ConfigError, match=r"unknown key 'learnig_rate' \(did you mean learning_rate"):
        load_stage(path, {}, VARS)


def test_wrong_type_names_the_key(tmp_path):
    path = write(tmp_path, "stage: sft\nmax_steps: ten\noutput_dir: o\n")
    with pytest.raises(ConfigError, match="max_steps.*expected int"):
        load_stage(path, {}, VARS)


def test_unknown_stage_kind(tmp_path):
    with pytest.raises(ConfigError, match="'stage' must be one of"):
        load_stage(write(tmp_path, "stage: bake\n"), {}, VARS)


def test_overrides_are_typed_and_win(tmp_path):
    path = write(tmp_path, "stage: train\nweighting: prior\nmax_steps: 5\noutput_dir: o\n")
    stage = load_stage(path, parse_override_args(["--max_steps", "7", "--learning_rate=2e-4", "--drop_prompt"]), VARS)
    assert stage.trainer_kwargs["max_steps"] == 7
    assert stage.trainer_kwargs["learning_rate"] == pytest.approx(2e-4)
    assert stage.config.drop_prompt is True


def test_row_templates_keep_their_braces(tmp_path):
    path = write(tmp_path, 'stage: score\nmodel: "{run_dir}/ref"\nprompt_template: "Q: {question}"\noutput_dir: s\n')
    stage = load_stage(path, {}, VARS)
    assert stage.config.model == "runs/x/ref"
    assert stage.config.prompt_template == "Q: {question}"


@pytest.mark.parametrize(
    ("value", "annotation", "expected"),
    [("3", int, 3), ("1e-3", float, 1e-3), ("no", bool, False), ("none", int | None, None), ("{a: 1}", dict, {"a": 1})],
)
def test_coerce(value, annotation, expected):
    assert coerce(value, annotation, "k") == expected


def test_coerce_rejects_fractional_int():
    with pytest.raises(ConfigError, match="integer"):
        coerce(2.5, int, "k")


@pytest.mark.parametrize("recipe", ["critical_dpo", "critical_dpo/gsm8k_solutions"])
def test_one_model_override_reaches_every_stage(recipe):
    """`tokentrain run recipes/critical_dpo --model X`: the policy, the SFT bases, the scoring tokenizer and the
    evaluated base all become X (the recipe's {model} variable), none stays on the default."""
    recipe = ROOT / "recipes" / recipe
    assert recipe_variables(recipe)["model"] == "Qwen/Qwen2.5-1.5B"
    variables = {**recipe_variables(recipe, {"model": "org/other-7b"}), **VARS}
    seen = 0
    for path in recipe_stages(recipe):
        config = load_stage(path, {}, variables).config
        for key in ("model", "tokenizer"):
            value = getattr(config, key, "")
            if value and not value.startswith("runs/x"):
                assert value == "org/other-7b", (path.name, key)
                seen += 1
        if config.stage == "evaluate":
            assert config.models["base"] == "org/other-7b"
            seen += 1
        assert "Qwen" not in repr(config), path.name
    assert seen >= 6


def test_recipe_variables_refuse_reserved_names_and_lists(tmp_path):
    (tmp_path / "variables.yaml").write_text("run_dir: x\n")
    with pytest.raises(ConfigError, match="set by tokentrain"):
        recipe_variables(tmp_path)
    (tmp_path / "variables.yaml").write_text("model: [a, b]\n")
    with pytest.raises(ConfigError, match="single values"):
        recipe_variables(tmp_path)


def test_defaults_that_name_a_variable_are_expanded(tmp_path):
    path = write(tmp_path, "stage: prepare\ntask: e2e\noutput_dir: o\n")  # data_dir defaults to "{data_dir}"
    stage = load_stage(path, {}, {**VARS, "data_dir": "/shared/data"})
    assert stage.config.data_dir == "/shared/data"
