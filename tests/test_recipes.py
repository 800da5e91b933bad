"""The recipe runner and the CLI as TRL users expect them: --config, TRL/handbook key names, --help from the
dataclasses, scoped overrides, --from/--only, stage.json provenance (skip identical work, rerun stale work, stop on
changed work), and folders tokentrain did not write left alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tokentrain.cli import main
from tokentrain.config import ConfigError, load_stage

pytestmark = pytest.mark.usefixtures("one_thread")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------ TRL / handbook YAMLs


HANDBOOK_SFT = """\
# Model arguments
model_name_or_path: {model}
model_revision: main
torch_dtype: float32
attn_implementation: eager
trust_remote_code: false
# Data training arguments
dataset_name: {data}
dataset_train_split: train
dataset_test_split: test
# LoRA
use_peft: true
lora_r: 4
lora_alpha: 8
lora_dropout: 0.0
lora_target_modules:
- q_proj
- v_proj
# SFT trainer config
eval_strategy: steps
eval_steps: 2
learning_rate: 1.0e-3
lr_scheduler_type: cosine
max_steps: 2
per_device_train_batch_size: 2
per_device_eval_batch_size: 2
logging_steps: 1
save_strategy: "no"
seed: 42
report_to: none
output_dir: {out}
objective: sft
"""

HANDBOOK_DPO = """\
model_name_or_path: {model}
torch_dtype: float32
dataset_name: {data}
beta: 0.1
learning_rate: 5.0e-4
max_steps: 2
per_device_train_batch_size: 2
max_length: 64
logging_steps: 1
save_strategy: "no"
report_to: none
output_dir: {out}
objective: dpo
"""


def test_handbook_sft_yaml_trains_with_only_objective_added(tmp_path, pc_rows, tiny_model_dir):
    data = tmp_path / "data"
    write_rows(data / "train.jsonl", pc_rows[:8])
    write_rows(data / "test.jsonl", pc_rows[8:])
    config = write(tmp_path / "sft.yaml", HANDBOOK_SFT.format(model=tiny_model_dir, data=data, out=tmp_path / "out"))
    assert main(["train", "--config", str(config)]) == 0
    out = tmp_path / "out"
    assert (out / "adapter_config.json").exists()  # use_peft: a LoRA adapter on q_proj, v_proj
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"] and adapter["r"] == 4
    summary = json.loads((out / "train_summary.json").read_text())
    assert any("eval_loss" in e for e in summary["log_history"])  # dataset_test_split was evaluated
    record = json.loads((out / "stage.json").read_text())
    assert record["stage"] == "sft" and record["config"]["model"] == str(tiny_model_dir)  # named after its file
    assert record["config"]["dataset"] == str(data) and record["config"]["report_to"] == "none"


def test_handbook_dpo_yaml_trains_with_only_objective_added(tmp_path, tiny_model_dir):
    rows = [
        {"prompt": f"<s>name[Aromi], food[{f}]<sep>", "chosen": f"Aromi serves {f} food.", "rejected": "Aromi."}
        for f in ("Italian", "French", "Chinese", "Indian")
    ]
    write_rows(tmp_path / "pairs.jsonl", rows)
    text = HANDBOOK_DPO.format(model=tiny_model_dir, data=tmp_path / "pairs.jsonl", out=tmp_path / "out")
    config = write(tmp_path / "dpo.yaml", text)
    assert main(["train", str(config)]) == 0  # positional form, like --config
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert any("rewards/margins" in e for e in summary["log_history"])
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_a_key_under_both_names_with_different_values_is_an_error(tmp_path):
    path = write(tmp_path / "s.yaml", "stage: sft\nmodel: a\nmodel_name_or_path: b\noutput_dir: o\n")
    with pytest.raises(ConfigError, match="'model' and its TRL name 'model_name_or_path'"):
        load_stage(path)
    same = write(tmp_path / "t.yaml", "stage: sft\nmodel: a\nmodel_name_or_path: a\noutput_dir: o\n")
    assert load_stage(same).config.model == "a"


def test_lora_keys_without_use_peft_are_refused(tmp_path, capsys):
    path = write(tmp_path / "s.yaml", "stage: sft\nmodel: m\ndataset: d.jsonl\nlora_r: 8\noutput_dir: o\n")
    assert main(["sft", str(path)]) == 2
    assert "lora_r set but use_peft is false" in capsys.readouterr().err


def test_report_to_none_stays_the_string_trl_expects(tmp_path):
    path = write(tmp_path / "s.yaml", "stage: sft\nreport_to: none\nmax_length: none\noutput_dir: o\n")
    stage = load_stage(path)
    assert stage.trainer_kwargs["report_to"] == "none" and stage.trainer_kwargs["max_length"] is None


def test_config_flag_errors(tmp_path, capsys):
    assert main(["sft", "--config", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["sft", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "stage file not found" in capsys.readouterr().err
    path = write(tmp_path / "s.yaml", "stage: sft\n")
    assert main(["sft", str(path), "--config", str(path)]) == 2
    assert "give the stage file once" in capsys.readouterr().err
    assert main(["prepare", str(path)]) == 2  # a sft file given to the prepare command
    assert "is a 'sft' stage, not 'prepare'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ --help


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"], ["run", "--help"]])
def test_help_imports_neither_torch_nor_trl(argv):
    code = (
        "import sys\nfrom tokentrain.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'trl', 'transformers', 'datasets', 'accelerate') if m in sys.modules)\n"
        "print('HEAVY', heavy)"
    )
    result = _fresh_python(code)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr


def test_stage_help_lists_every_key_with_help_and_defaults(capsys):
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "stage keys (sft)" in out and "SFTConfig keys (the trainer config)" in out
    assert "--model MODEL, --model_name_or_path MODEL" in out  # the TRL name as an alias
    assert "--dataset_split DATASET_SPLIT" in out and "--dataset_train_split" in out
    assert "--lora_r LORA_R" in out and "(default: 16)" in out
    assert "--learning_rate LEARNING_RATE" in out and "(default: 2e-05)" in out
    assert main(["train", "--objective", "critical_dpo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "CriticalDPOConfig keys" in out and "--reduction" in out and "--weighting" in out


# ------------------------------------------------------------------------------------ recipes: overrides, reruns

PREPARE = "stage: prepare\ntask: e2e_synthetic\nnum_rows: {rows}\nvocab_size: 300\nseed: 0\noutput_dir: {out}\n"
SFT = """\
stage: sft
model: "{run_dir}/data/init"
dataset: "{run_dir}/data/train.jsonl"
output_dir: model
max_steps: 1
learning_rate: 1.0e-3
per_device_train_batch_size: 4
max_length: 64
save_strategy: "no"
bf16: false
"""


@pytest.fixture
def recipe(tmp_path):
    """01_data (prepare) -> 02_model (sft on 01's rows and tiny model)."""
    folder = tmp_path / "recipe"
    write(folder / "01_data.yaml", PREPARE.format(rows=40, out="data"))
    write(folder / "02_model.yaml", SFT)
    return folder


def run(recipe, tmp_path, *extra):
    return main(["run", str(recipe), "--run_dir", str(tmp_path / "run"), *extra])


def mtime(path: Path) -> int:
    return (path / "stage.json").stat().st_mtime_ns


def test_rerun_skips_identical_work_stops_on_changes_and_reruns_stale_consumers(recipe, tmp_path, capsys):
    data, model = tmp_path / "run" / "data", tmp_path / "run" / "model"
    assert run(recipe, tmp_path) == 0
    record = json.loads((model / "stage.json").read_text())
    assert record["run_id"] and record["config"]["learning_rate"] == 1e-3
    assert str(data / "init") in record["inputs"] and record["inputs"][str(data / "init")]["path"] == "init"
    first = {p: mtime(p) for p in (data, model)}

    capsys.readouterr()
    assert run(recipe, tmp_path) == 0  # identical: both skipped
    assert capsys.readouterr().err.count("complete and unchanged, skipped") == 2
    assert {p: mtime(p) for p in (data, model)} == first

    # a changed key stops, naming it and the way out
    assert run(recipe, tmp_path, "--02_model.learning_rate", "0.5") == 2
    err = capsys.readouterr().err
    assert "02_model" in err and "learning_rate: 0.001 then, 0.5 now" in err and "--from 02_model" in err
    assert mtime(model) == first[model]

    # --only redoes one stage; its consumer is untouched until the next run, which finds it stale and reruns it
    assert run(recipe, tmp_path, "--only", "01_data") == 0
    assert mtime(data) != first[data] and mtime(model) == first[model]
    capsys.readouterr()
    assert run(recipe, tmp_path) == 0
    err = capsys.readouterr().err
    assert "stale, rerunning" in err and mtime(model) != first[model]

    # --from redoes that stage and the ones after it, and takes scoped overrides
    before = {p: mtime(p) for p in (data, model)}
    assert run(recipe, tmp_path, "--from", "02_model", "--02_model.learning_rate", "0.5") == 0
    assert mtime(data) == before[data] and mtime(model) != before[model]
    assert json.loads((model / "stage.json").read_text())["config"]["learning_rate"] == 0.5


def test_a_killed_training_stage_resumes_only_with_the_same_settings(recipe, tmp_path, capsys):
    """A partial `.tmp` holds the stage.json it was started with: other settings stop with the keys named."""
    assert run(recipe, tmp_path, "--only", "01_data") == 0
    partial = tmp_path / "run" / "model.tmp"
    partial.mkdir(parents=True)
    record = {"format": "tokentrain.stage", "version": 1, "config": {"learning_rate": 0.1}, "inputs": {}}
    (partial / "stage.json").write_text(json.dumps(record))
    (partial / "checkpoint-1").mkdir()
    capsys.readouterr()
    assert run(recipe, tmp_path) == 2
    err = capsys.readouterr().err
    assert "partial work started with other settings" in err and "learning_rate: 0.1 then, 0.001 now" in err
    assert (partial / "checkpoint-1").exists()  # nothing discarded without --overwrite
    assert run(recipe, tmp_path, "--overwrite") == 0
    assert not partial.exists() and (tmp_path / "run" / "model" / "_COMPLETE").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--from", "03_nope"], "--from '03_nope': "),
        (["--only", "03_nope"], "--only '03_nope': "),
        (["--03_nope.max_steps", "2"], "no stage named '03_nope'"),
        (["--02_model.learnig_rate", "2"], "stage 02_model has no key 'learnig_rate'"),
        (["--max_stepz", "2"], "override(s) ['max_stepz'] match no key"),
        (["--output_dir", "x"], "each stage has its own output_dir"),
        (["--from", "01_data", "--only", "02_model"], "not both"),
    ],
)
def test_bad_overrides_are_errors_naming_them(recipe, tmp_path, capsys, extra, message):
    assert run(recipe, tmp_path, *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any stage ran


def test_scoped_override_reaches_one_stage(tmp_path):
    folder = tmp_path / "recipe"
    write(folder / "01_a.yaml", PREPARE.format(rows=30, out="a"))
    write(folder / "02_b.yaml", PREPARE.format(rows=30, out="b"))
    assert run(folder, tmp_path, "--02_b.num_rows", "60") == 0
    a, b = (json.loads((tmp_path / "run" / n / "stage.json").read_text())["config"] for n in "ab")
    assert a["num_rows"] == 30 and b["num_rows"] == 60


def test_a_recipe_folder_without_stage_files_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["run", str(tmp_path / "empty")]) == 2
    assert "holds no numbered stage files" in capsys.readouterr().err


def test_an_unknown_variable_is_an_error_not_a_folder_named_after_it(tmp_path, capsys):
    folder = tmp_path / "recipe"
    write(folder / "01_a.yaml", PREPARE.format(rows=30, out='"{rundir}/a"'))
    assert run(folder, tmp_path) == 2
    assert "names the variable(s) ['rundir'], which are not set" in capsys.readouterr().err
    assert not list(tmp_path.rglob("{rundir}"))


# ------------------------------------------------------------------------------------ what the user owns


def test_folders_tokentrain_did_not_write_are_never_deleted(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "important.txt").write_text("keep me")
    argv = ["prepare", "--task", "e2e_synthetic", "--num_rows", "30", "--vocab_size", "300", "--output_dir", str(out)]
    for extra in ([], ["--overwrite"]):
        assert main([*argv, *extra]) == 2
        assert "was not written by tokentrain" in capsys.readouterr().err
        assert (out / "important.txt").read_text() == "keep me"
    file_out = tmp_path / "a_file"
    file_out.write_text("x")
    assert main([*argv[:-1], str(file_out)]) == 2
    assert "is a file" in capsys.readouterr().err and file_out.read_text() == "x"


def test_single_stage_command_is_named_after_its_kind_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmpdir"))
    (tmp_path / "tmpdir").mkdir()
    out = tmp_path / "d"
    assert (
        main(
            ["prepare", "--task", "e2e_synthetic", "--num_rows", "30", "--vocab_size", "300", "--output_dir", str(out)]
        )
        == 0
    )
    assert json.loads((out / "stage.json").read_text())["stage"] == "prepare"
    assert not list((tmp_path / "tmpdir").iterdir())


def test_quickstarts_default_to_their_own_run_folder(monkeypatch):
    import tokentrain.recipes as recipes
    from tokentrain import quickstart

    seen = []
    monkeypatch.setattr(recipes, "run_recipe", lambda recipe, run_dir, *a, **k: seen.append(run_dir) or run_dir)
    for stem in ("weighted_ntp", "critical_dpo"):
        quickstart.quickstart(stem)  # the recipe did not really run: the summary finds nothing, and says nothing
    assert seen == [str(Path("runs/quickstart/weighted_ntp")), str(Path("runs/quickstart/critical_dpo"))]


def test_signal_meta_names_the_tokenizer_so_inspect_works_from_any_folder(
    tmp_path, pc_rows, tiny_model_dir, monkeypatch
):
    import shutil

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(tiny_model_dir, work / "ref")
    write_rows(work / "rows.jsonl", pc_rows)
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    assert main(["score", "--model", "ref", "--dataset", "rows.jsonl", "--output_dir", "scored"]) == 0
    meta = json.loads((work / "scored" / "signal_meta.json").read_text())
    assert Path(meta["tokenizer"]).is_absolute()
    monkeypatch.chdir(elsewhere)
    assert main(["inspect", str(work / "scored"), "--column", "ref_logps", "--out", "heat.html"]) == 0
    assert (elsewhere / "heat.html").stat().st_size > 1000


# ------------------------------------------------------------------------------------ packaging


@pytest.mark.slow
def test_wheel_installs_and_runs_a_quickstart_from_another_folder(tmp_path):
    """A plain (non-editable) install: the quickstart, the accelerate configs and launch.sh come from the package."""
    import os
    import site
    import venv

    repo = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(repo),
        ],
        check=True,
        timeout=600,
    )
    wheel = next((tmp_path / "dist").glob("tokentrain-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    clean = {
        k: v for k, v in os.environ.items() if k != "PYTHONPATH"
    }  # a checkout on the path would count as installed
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True,
        timeout=600,
        cwd=tmp_path,
        env=clean,
    )
    # the dependencies (torch, TRL, ...) from this interpreter's site-packages; the editable tokentrain there is
    # loaded through a .pth file, which PYTHONPATH entries do not process, so `import tokentrain` finds the wheel
    env = {
        "PYTHONPATH": ":".join(site.getsitepackages()),
        "PATH": f"{env_dir / 'bin'}:/usr/bin:/bin",
        "OMP_NUM_THREADS": "1",
    }
    where = subprocess.run(
        [str(python), "-c", "import tokentrain; print(tokentrain.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(env_dir) in where.stdout  # the installed copy, not the checkout
    launch = subprocess.run(
        [str(env_dir / "bin" / "tokentrain"), "launch", "--dry-run", "--accelerate_config", "zero3", "recipes/x"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(env_dir) in launch.stdout and "zero3.yaml" in launch.stdout
    result = subprocess.run(
        [str(env_dir / "bin" / "tokentrain"), "quickstart", "weighted_ntp"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "quickstart weighted_ntp finished" in result.stdout
    assert (tmp_path / "runs" / "quickstart" / "weighted_ntp" / "eval" / "eval.json").exists()


# ------------------------------------------------------------------------------------ layering (DESIGN.md)

# package -> modules it must never import: cli -> recipes -> stages -> signals, trainers, tasks -> data, models -> ...
FORBIDDEN = {
    "stages": {"cli", "recipes", "config", "quickstart"},
    "trainers": {"cli", "recipes", "config", "stages", "quickstart"},
    "signals": {"cli", "recipes", "config", "stages", "quickstart"},
    "tasks": {"cli", "recipes", "config", "stages", "quickstart", "trainers"},
    "losses": {"cli", "recipes", "config", "stages", "quickstart", "trainers", "signals", "data", "models"},
}


def _imported_modules(path: Path) -> set[str]:
    """tokentrain module names imported by `path` (absolute or relative imports, at any depth)."""
    import ast

    package = path.parent.relative_to(path.parents[len(path.relative_to(ROOT).parts) - 1]).parts  # e.g. (stages,)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[1:][: len(package[1:]) - node.level + 1]) if node.level > 1 else list(package[1:])
                parts = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("tokentrain"):
                parts = node.module.split(".")[1:]
            else:
                continue
            names = [".".join(parts + [a.name]) for a in node.names] if not node.module else [".".join(parts)]
            out.update(n.split(".")[0] for n in names if n)
    return out


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_runs_back_up_the_layers(package):
    bad = {}
    for path in sorted((ROOT / "tokentrain" / package).glob("*.py")):
        hits = _imported_modules(path) & FORBIDDEN[package]
        if hits:
            bad[path.name] = sorted(hits)
    assert not bad, f"tokentrain/{package} imports upward: {bad}"


def test_reverse_dpo_swaps_sides_and_takes_an_explicit_reference(
    tmp_path, tiny_model_dir, pc_rows, capsys, monkeypatch
):
    from trl import DPOTrainer

    rows = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "Aromi."} for r in pc_rows[:4]]
    write_rows(tmp_path / "pairs.jsonl", rows)
    seen = {}
    real = DPOTrainer.__init__

    def spy(self, model, ref_model=None, args=None, train_dataset=None, **kwargs):
        seen["first_chosen"], seen["ref"] = train_dataset[0]["chosen"], ref_model
        return real(self, model, ref_model=ref_model, args=args, train_dataset=train_dataset, **kwargs)

    monkeypatch.setattr(DPOTrainer, "__init__", spy)
    argv = ["train", "--objective", "dpo", "--model", str(tiny_model_dir), "--dataset", str(tmp_path / "pairs.jsonl")]
    argv += ["--ref_model", str(tiny_model_dir), "--swap_chosen_rejected", "true", "--max_steps", "1"]
    argv += ["--per_device_train_batch_size", "2", "--max_length", "64", "--output_dir", str(tmp_path / "rev")]
    assert main(argv) == 0
    assert seen["first_chosen"] == "Aromi." and seen["ref"] is not None and not seen["ref"].training
    bad = ["train", "--objective", "weighted_ntp", "--weighting", "column", "--model", str(tiny_model_dir)]
    bad += [
        "--dataset",
        str(tmp_path / "pairs.jsonl"),
        "--ref_model",
        str(tiny_model_dir),
        "--output_dir",
        str(tmp_path / "x"),
    ]
    assert main(bad) == 2
    assert "ref_model has no effect with objective 'weighted_ntp'" in capsys.readouterr().err


@pytest.mark.parametrize(("kind", "extra"), [("evaluate", ["--task", "arithmetic"]), ("generate", [])])
def test_stage_help_with_a_percent_sign_in_a_help_text(kind, extra, capsys):
    assert main([kind, *extra, "--help"]) == 0
    assert "index % 4" in capsys.readouterr().out


def test_a_bad_trainer_key_leaves_nothing_that_blocks_the_corrected_rerun(recipe, tmp_path, capsys):
    assert run(recipe, tmp_path, "--only", "01_data") == 0
    assert run(recipe, tmp_path, "--02_model.lr_scheduler_type", "not_a_schedule") == 2
    assert "not_a_schedule" in capsys.readouterr().err
    assert run(recipe, tmp_path) == 0  # corrected: runs, no "partial work started with other settings"
    assert (tmp_path / "run" / "model" / "_COMPLETE").exists()


def test_recipe_dir_names_a_file_beside_the_recipe_wherever_the_run_starts(tmp_path, monkeypatch):
    """recipes/unlearning/mini named its dictionary `recipes/unlearning/alice_terms.yaml`, which only resolved from the
    repository root; `{recipe_dir}` in variables.yaml is the recipe's own folder, also inside a grid's sub-recipe."""
    from tokentrain.config import load_stage, recipe_variables

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)  # anywhere but the repository
    mini = root / "recipes" / "unlearning" / "mini"
    own = recipe_variables(mini)
    assert own["terms"] == str(root / "recipes" / "unlearning" / "alice_terms.yaml")
    assert Path(own["terms"]).is_file() and Path(own["prompts"]).is_file()
    assert recipe_variables(mini, {"terms": "mine.yaml"})["terms"] == "mine.yaml"  # the command line still wins
    labels = mini / "alice" / "02_labels.yaml"  # a stage of the grid's sub-recipe, given the outer recipe's variables
    stage = load_stage(labels, {}, {**own, "run_dir": str(tmp_path), "top_dir": str(tmp_path), "seed": "0"})
    assert stage.config.anchor_terms == own["terms"]


def test_quickstart_takes_overrides_as_run_does(monkeypatch, tmp_path, capsys):
    """`tokentrain quickstart weighted_ntp --activation_checkpointing true` was refused ("takes no extra options"):
    the quickstart's keys are overridden as `tokentrain run` overrides a recipe's, and an unknown key is an error
    before anything runs."""
    import tokentrain.recipes as recipes

    seen = []
    real = recipes.run_recipe
    monkeypatch.setattr(recipes, "run_recipe", lambda recipe, run_dir, data, overrides, *a, **k: seen.append(overrides))
    argv = ["quickstart", "weighted_ntp", "--run_dir", str(tmp_path / "qs"), "--activation_checkpointing", "true"]
    assert main([*argv, "--05_ntp.learning_rate", "1e-3"]) == 0
    assert seen == [{"activation_checkpointing": "true", "05_ntp.learning_rate": "1e-3"}]
    monkeypatch.setattr(recipes, "run_recipe", real)
    assert main(["quickstart", "weighted_ntp", "--run_dir", str(tmp_path / "qs2"), "--no_such_key", "1"]) != 0
    assert "no_such_key" in capsys.readouterr().err and not (tmp_path / "qs2").exists()
