"""Train every objective's case (bench/objective_cases.py) in one launch, and save what the topology tests compare.

    ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/cpu.yaml \
        tests/scripts/topology_train.py --policy DIR --cases DIR --runs runs.json --out DIR [--cpu_fsdp]

`runs.json` is a list of {"name", "stem", "args": {config keys}}: each run builds the stem's trainer from
`<cases>/<stem>/case.json` on the saved policy, trains, saves the final model with `trainer.save_model` (the train
stage's save: full weights gathered from FSDP2 / ZeRO-3 shards) and writes, in `<out>/<name>/`:
- `model/` the saved model; `log.json` (main process): Trainer's log history, the process count, the distributed
  type, the saved parameter count after reloading the folder (`reload_check`);
- `placement_<rank>.json`: elements of the policy and of each frozen model held by that process, and their wrappers.
A run that raises on every rank writes `error_<rank>.txt` (the exception's last line) instead, and the launch goes
on with the next run. Several runs per launch: the processes start once. `--cpu_fsdp` lets accelerate's FSDP2 path run
on CPU (`objective_cases.force_fsdp_on_cpu`). The same `run_one` trains the 1-process references in the test process.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.objective_cases import Case, make_trainer, placement, reload_check, saved_weights  # noqa: E402


def run_one(policy: Path, cases: Path, out: Path, name: str, stem: str, args: dict) -> dict:
    """Train one run; returns its record (the main process also writes it to `<out>/<name>/log.json`)."""
    folder = Path(out) / name
    case = Case.load(Path(cases) / stem)
    trainer = make_trainer(case, policy, folder / "run", **args)
    trainer.train()
    acc = trainer.accelerator
    where = placement(trainer, case.aux_attributes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"placement_{acc.process_index}.json").write_text(json.dumps(where))
    trainer.save_model(str(folder / "model"))
    acc.wait_for_everyone()
    record = {
        "log": trainer.state.log_history,
        "processes": acc.num_processes,
        "distributed_type": str(acc.distributed_type).split(".")[-1],
    }
    if acc.is_main_process:
        record["reloaded_parameters"] = reload_check(folder / "model", saved_weights(folder / "model"))
        (folder / "log.json").write_text(json.dumps(record))
    acc.wait_for_everyone()
    return record


def main() -> int:
    parser = argparse.ArgumentParser()
    for key in ("--policy", "--cases", "--runs", "--out"):
        parser.add_argument(key, required=True)
    parser.add_argument("--cpu_fsdp", action="store_true", help="run accelerate's FSDP2 path on CPU (gloo)")
    a = parser.parse_args()
    if a.cpu_fsdp:
        from bench.objective_cases import force_fsdp_on_cpu

        force_fsdp_on_cpu()
    from accelerate import PartialState

    for run in json.loads(Path(a.runs).read_text()):
        try:
            run_one(Path(a.policy), Path(a.cases), Path(a.out), **run)
        except Exception as e:  # every rank raises the same error here: record it, meet again, go on with the next run
            folder = Path(a.out) / run["name"]
            folder.mkdir(parents=True, exist_ok=True)
            message = "".join(traceback.format_exception_only(e)).strip()
            (folder / f"error_{PartialState().process_index}.txt").write_text(message)
            print(f"run {run['name']} failed: {message}", file=sys.stderr, flush=True)
            PartialState().wait_for_everyone()
    from tokentrain.runtime import exit_process

    return exit_process(0)  # a gloo rank can abort at interpreter exit after its work is done: see its docstring


if __name__ == "__main__":
    sys.exit(main())
