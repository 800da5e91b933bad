"""concept_heads on 2 real CPU processes (gloo, `accelerate launch` with the repo's cpu.yaml): spec section 6.7
"2 processes x batch 2 = batch 4 x GA 1", and section 3's distribution claim: the whole loss (backbone, heads, chunked
CE) runs inside DDP's forward through `_ForwardRedirection`, the per-head normalisers are gathered over processes.

This file is also the launched script (`python this_file.py --model ... --rows ... --heads ... --out ...`): one launch
trains every 2-process run; the 1-process references run in the test process with the same `run_one`. Marked slow:
the launch costs two interpreter start-ups (~30 s on 2 loaded cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = next(
    p
    for p in (
        REPO / "tokentrain" / "shipped" / "accelerate_configs" / "cpu.yaml",
        REPO / "accelerate_configs" / "cpu.yaml",
    )
    if p.exists()
)
ATOL = 1e-6

# name -> (2-process run, overrides of the 1-process run that must match it). Plain SGD, sequential order: step s of
# 2 processes x batch 2 holds the rows of 1 process x batch 4.
RUNS = {
    "heads": ({"phase": "heads", "batch": 2, "ga": 1}, {"batch": 4}),
    "finetune_full": ({"phase": "finetune", "finetune": "full", "batch": 2, "ga": 1}, {"batch": 4}),
    "finetune_full_ga": ({"phase": "finetune", "finetune": "full", "batch": 1, "ga": 2}, {"batch": 4, "ga": 1}),
    "finetune_lora": ({"phase": "finetune", "finetune": "lora", "batch": 2, "ga": 1}, {"batch": 4}),
}


def run_one(model_dir, rows_path, heads_dir, out_dir, name, phase, batch, ga, steps=2, **config):
    """One run; returns (log_history, {parameter name: tensor}) on every process."""
    from tokentrain.data import load_rows
    from tokentrain.models import load_model, load_tokenizer
    from tokentrain.trainers.concept_heads import ConceptHeadsConfig, ConceptHeadsTrainer

    peft_config = None
    if phase == "finetune":
        config.update(beta=0.5, schedule="constant")  # a large head term: the heads' gradients matter
        if config.get("finetune") == "lora":
            from peft import LoraConfig

            # CAFT's adapter without dropout (random masks differ between 1 and 2 processes); lr 5: LoRA B starts at 0
            config["learning_rate"] = 5.0
            peft_config = LoraConfig(
                r=8,
                lora_alpha=16,
                lora_dropout=0.0,
                task_type="CAUSAL_LM",
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            )
    args = ConceptHeadsConfig(
        output_dir=str(Path(out_dir) / name),
        phase=phase,
        num_aux_heads=3,
        heads_path=str(heads_dir),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=ga,
        max_steps=steps,
        optim="sgd",
        learning_rate=config.pop("learning_rate", 0.5),
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        train_sampling_strategy="sequential",
        max_length=None,
        bf16=False,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        **config,
    )
    trainer = ConceptHeadsTrainer(
        load_model(model_dir, dtype="float32"),
        args,
        train_dataset=load_rows(rows_path),
        processing_class=load_tokenizer(model_dir),
        peft_config=peft_config,
    )
    trainer.train()
    weights = {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters()}
    return trainer.state.log_history, weights


def main() -> int:
    import torch
    from accelerate import PartialState

    from tokentrain.runtime import exit_process

    parser = argparse.ArgumentParser()
    for key in ("--model", "--rows", "--heads", "--out"):
        parser.add_argument(key, required=True)
    a = parser.parse_args()
    state = PartialState(cpu=True)
    assert state.num_processes == 2, state.num_processes
    for name, (two, _) in RUNS.items():
        log, weights = run_one(a.model, a.rows, a.heads, a.out, name, **two)
        if state.is_main_process:
            folder = Path(a.out) / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "log.json").write_text(json.dumps({"processes": state.num_processes, "log": log}))
            torch.save(weights, folder / "weights.pt")
        state.wait_for_everyone()
    return exit_process(0)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())


# ------------------------------------------------------------------------------------------------------- tests

import pytest  # noqa: E402
import torch  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(pc_rows, tiny_model_dir, tmp_path_factory):
    from tokentrain.heads import AuxHeads, AuxHeadsConfig
    from tokentrain.models import load_model

    folder = tmp_path_factory.mktemp("mp_concept_heads")
    rows = folder / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n" for r in pc_rows[:8])
    )
    heads = AuxHeads.attach(load_model(tiny_model_dir, dtype="float32"), AuxHeadsConfig(3, "decoder_layer"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return rows, heads.save(folder / "heads")


@pytest.fixture(scope="module")
def launched(tiny_model_dir, inputs, tmp_path_factory):
    rows, heads = inputs
    out = tmp_path_factory.mktemp("mp_concept_heads_out")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CPU_CONFIG),
        __file__,
        "--model",
        str(tiny_model_dir),
        "--rows",
        str(rows),
        "--heads",
        str(heads),
        "--out",
        str(out),
    ]
    start = time.time()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    print(f"accelerate launch of {len(RUNS)} concept_heads runs: {time.time() - start:.1f} s")
    results = {}
    for name in RUNS:
        record = json.loads((out / name / "log.json").read_text())
        assert record["processes"] == 2
        results[name] = (record["log"], torch.load(out / name / "weights.pt"))
    return results


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_equal_one(launched, inputs, tiny_model_dir, tmp_path, name):
    rows, heads = inputs
    two, one = RUNS[name]
    log_1, weights_1 = run_one(tiny_model_dir, rows, heads, tmp_path, name, **{**two, **one})
    log_2, weights_2 = launched[name]
    losses = [h["loss"] for h in log_2 if "loss" in h]
    assert losses == pytest.approx([h["loss"] for h in log_1 if "loss" in h], rel=1e-6, abs=ATOL) and len(losses) == 2
    if two["ga"] == 1:  # count_i: valid targets per micro-batch, summed over processes (mean over the window)
        counts = [h["concept_heads/count_1"] for h in log_2 if "concept_heads/count_1" in h]
        assert counts == [h["concept_heads/count_1"] for h in log_1 if "concept_heads/count_1" in h]
    assert weights_1.keys() == weights_2.keys()
    for key in weights_1:
        torch.testing.assert_close(weights_2[key], weights_1[key], atol=ATOL, rtol=0, msg=key)


def test_the_runs_moved_the_trained_weights(launched, inputs, tiny_model_dir):
    """Guards against a vacuous comparison: each run moved the weights it trains."""
    from safetensors.torch import load_file

    from tokentrain.models import load_model

    _, heads = inputs
    start = load_file(str(heads / "heads.safetensors"))
    trained = launched["heads"][1]
    assert max((trained[f"concept_heads.{k}"] - v).abs().max().item() for k, v in start.items()) > 1e-4
    base = dict(load_model(tiny_model_dir, dtype="float32").named_parameters())
    full = launched["finetune_full"][1]
    assert max((full[k] - base[k]).abs().max().item() for k in base) > 1e-4
    lora = launched["finetune_lora"][1]
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 1e-6
