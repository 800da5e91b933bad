"""Train `WeightedNTPTrainer` runs for the multi-process tests and save what they compare.

    ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/cpu.yaml \
        tests/scripts/wntp_train.py --model DIR --rows rows.jsonl --runs runs.json --out DIR

`runs.json` is a list of {"name", "weighting", "batch", "ga", "steps", ...WeightedNTPConfig fields}. Each run starts
from the same saved tiny model, reads the rows in order (sequential sampler: with 2 processes x batch b, step s holds
the same rows as 1 process x batch 2b) and takes plain SGD steps (no clipping, no schedule). The main process writes
`<out>/<name>/weights.pt` (every parameter after the last step) and `<out>/<name>/log.json` (Trainer's log history,
whose losses are already averaged over processes). Several runs per launch: the processes start only once.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from accelerate import PartialState

from tokentrain.data import load_rows
from tokentrain.models import load_model, load_tokenizer
from tokentrain.runtime import exit_process
from tokentrain.trainers.weighted_ntp import WeightedNTPConfig, WeightedNTPTrainer


def run_one(model_dir, rows_path, out_dir, name, weighting, batch, ga, steps, lr=0.5, **config):
    """One run; returns (log_history, {parameter name: tensor}) on every process."""
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype="float32")
    args = WeightedNTPConfig(
        output_dir=str(Path(out_dir) / name),
        weighting=weighting,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=ga,
        max_steps=steps,
        optim="sgd",
        learning_rate=lr,
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
    trainer = WeightedNTPTrainer(model, args=args, train_dataset=load_rows(rows_path), processing_class=tokenizer)
    trainer.train()
    weights = {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters()}
    return trainer.state.log_history, weights


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--rows", required=True)
    parser.add_argument("--runs", required=True, help="JSON file: a list of run configs")
    parser.add_argument("--out", required=True)
    a = parser.parse_args()
    for run in json.loads(Path(a.runs).read_text()):
        log, weights = run_one(a.model, a.rows, a.out, **run)
        # Read the state after TrainingArguments set it up: on CPU a bare PartialState() made earlier sees no
        # distributed environment (it ignores ACCELERATE_USE_CPU; TrainingArguments resets it with cpu=True).
        state = PartialState()
        assert state.num_processes == int(os.environ.get("EXPECT_PROCESSES", state.num_processes)), state
        if state.is_main_process:
            folder = Path(a.out) / run["name"]
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(weights, folder / "weights.pt")
            (folder / "log.json").write_text(json.dumps({"log": log, "processes": state.num_processes}, indent=1))
        state.wait_for_everyone()
    exit_process(0)  # a gloo rank can abort at interpreter exit after its work is done: see its docstring


if __name__ == "__main__":
    main()
