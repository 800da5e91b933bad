"""`stage: sft` (TRL's SFTTrainer, the baseline) and `stage: train` (an objective's trainer).

The training arguments are built before the model is loaded (so DeepSpeed ZeRO-3's `zero.Init` applies to it), the
model is loaded in float32 unless `dtype` says otherwise (TRL autocasts with `bf16`), and a killed stage resumes from
its last checkpoint. The saved folder is a plain model (or PEFT adapter) with its tokenizer and `train_summary.json`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from ..runtime import QUIET_SECONDS, distributed_state, is_terminal
from .base import (
    RENAMED_TRAINER_KEYS,
    ConfigError,
    ModelKeys,
    RowsStage,
    Stage,
    StageContext,
    load_stage_rows,
    require,
    stage_output,
)
from .trackers import tracker_callbacks, tracker_env, tracker_names

logger = logging.getLogger(__name__)


@dataclass
class SFTConfig(RowsStage, ModelKeys):
    model: str = field(
        default="",
        metadata={"help": "Hub name or folder of the model to train.", "aliases": ["--model_name_or_path"]},
    )
    dataset_test_split: str = field(
        default="",
        metadata={"help": "Split evaluated during training when eval_strategy is not 'no' (TRL's name; default none)."},
    )
    drop_prompt: bool = field(
        default=False, metadata={"help": "Train on [BOS] + completion alone (PRIOR's text-only reference)."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of every weight."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (with use_peft)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (with use_peft)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (with use_peft)."})
    lora_target_modules: list | str | None = field(
        default=None,
        metadata={
            "help": "LoRA target modules (with use_peft): a list, 'all-linear', or a comma-separated string; default: "
            "PEFT's choice for the architecture, as TRL."
        },
    )
    eval_holdout: int = field(
        default=0,
        metadata={
            "help": "Hold out the last N rows as the eval set (with eval_strategy, load_best_model_at_end: the best "
            "checkpoint is the one saved)."
        },
    )
    stop_dataset: str = field(
        default="", metadata={"help": "Rows graded greedily during training (with stop_task) to stop early."}
    )
    stop_task: str = field(default="", metadata={"help": "Grader of stop_dataset: gsm8k, math or arithmetic."})
    stop_accuracy: float = field(
        default=0.0, metadata={"help": "Stop training at the first check with this greedy accuracy or more."}
    )
    stop_check_from: int = field(default=0, metadata={"help": "First step at which the accuracy is checked."})
    stop_check_every: int = field(default=25, metadata={"help": "Steps between accuracy checks."})
    stop_max_new_tokens: int = field(default=64, metadata={"help": "Greedy decoding budget of the checks."})
    reward_curve_dataset: str = field(
        default="",
        metadata={
            "help": "keyword_length rows (prompt, keyword) sampled before training and every reward_curve_every "
            "steps; each check's mean true reward goes to the log history (the aligndistil mini's convergence)."
        },
    )
    reward_curve_every: int = field(default=10, metadata={"help": "Steps between reward_curve_dataset checks."})

    def trainer_config_class(self):
        from trl import SFTConfig as TrlSFTConfig

        return TrlSFTConfig


@dataclass
class TrainConfig(SFTConfig):
    objective: str = field(
        default="weighted_ntp",
        metadata={"help": "Objective stem (see `tokentrain --help`), or the TRL baselines 'sft' and 'dpo'."},
    )
    ref_model: str = field(
        default="",
        metadata={
            "help": "The frozen reference of a preference objective (dpo, critical_dpo), e.g. the SFT model the policy "
            "starts from; empty: TRL's default (the policy's weights reloaded, or its adapter turned off)."
        },
    )
    swap_chosen_rejected: bool = field(
        default=False,
        metadata={
            "help": "Swap the chosen and rejected responses of every row (the reverse DPO model of aligndistil)."
        },
    )

    def trainer_config_class(self):
        from ..objectives import objective

        try:
            return objective(self.objective)[0]
        except ValueError as e:
            raise ConfigError(str(e)) from None


CONFIGS = {"sft": SFTConfig, "train": TrainConfig}

LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


def run(stage: Stage, ctx: StageContext) -> None:
    """Train and save to output_dir; resume from the last checkpoint of a killed run with the same settings."""
    from ..data import check_rows
    from ..models import load_model, load_tokenizer

    cfg = stage.config
    require(stage, "model", "dataset")
    peft_config = _peft_config(stage)
    config_cls, trainer_cls = _classes(cfg)
    tokenizer = load_tokenizer(cfg.model, revision=cfg.model_revision, trust_remote_code=cfg.trust_remote_code)
    dataset = load_stage_rows(cfg)
    if cfg.stage == "train":
        _check_signal_meta(stage, tokenizer)
    elif "input_ids" not in dataset.column_names:  # pre-tokenised rows go to TRL as they are (it skips preparation)
        check_rows(dataset)  # TRL's SFTTrainer would fail on a bad row with a message that names neither it nor why
    if cfg.stage == "sft" and cfg.drop_prompt:
        dataset = _drop_prompt_rows(dataset, tokenizer)
    if cfg.stage == "train" and cfg.swap_chosen_rejected:
        dataset = _swap_sides(stage, dataset)
    dataset, eval_dataset = _eval_split(stage, dataset)
    extra = _reference(stage, trainer_cls) if cfg.stage == "train" else {}
    stoppers = [AccuracyStop(cfg, tokenizer)] if cfg.stop_accuracy > 0 else []
    curve = []
    if cfg.reward_curve_dataset:
        from ..tasks.keyword_length import RewardCurve

        curve = [RewardCurve(cfg.reward_curve_dataset, tokenizer, cfg.reward_curve_every, cfg.seed)]
    # the arguments first: a bad key stops here, before any folder exists; and before the model, so ZeRO-3's
    # zero.Init applies to it
    out = Path(cfg.output_dir)
    args = config_cls(output_dir=str(out.with_name(out.name + ".tmp")), seed=cfg.seed, **_trainer_kwargs(stage))
    _check_schedule(stage, args)
    with stage_output(stage, ctx, keep_partial=True) as tmp, tracker_env(stage, tmp):
        model = load_model(cfg.model, **cfg.model_kwargs(trainable=True))
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=stoppers + curve,
            **extra,
        )
        show_progress(trainer)
        for stopper in stoppers:  # the accuracy checks go to the run's trackers too
            stopper.trackers = tracker_callbacks(trainer)
        last = _resume_point(stage, tmp)
        start = time.time()
        result = trainer.train(resume_from_checkpoint=last)
        trainer.save_model(str(tmp))
        if trainer.accelerator.is_main_process:
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            _check_saved_weights(tmp, unwrapped, getattr(trainer, "saved_parameters", None))
            tokenizer.save_pretrained(str(tmp))
            for ckpt in tmp.glob("checkpoint-*"):
                shutil.rmtree(ckpt)
            summary = {"train_seconds": round(time.time() - start, 1), **result.metrics, "stage": stage.name}
            summary["log_history"] = trainer.state.log_history
            if trainer.state.best_metric is not None:  # load_best_model_at_end: the saved model is this checkpoint's
                summary["best_metric"] = trainer.state.best_metric
                summary["best_step"] = int(Path(trainer.state.best_model_checkpoint).name.split("-")[-1])
            if stoppers:
                summary["accuracy_checks"] = stoppers[0].checks
            (tmp / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _swap_sides(stage: Stage, dataset):
    missing = [c for c in ("chosen", "rejected") if c not in dataset.column_names]
    if missing:
        raise ConfigError(f"{stage.name}: swap_chosen_rejected needs preference rows; missing columns {missing}")
    stored = [c for c in dataset.column_names if c.startswith(("chosen_", "rejected_"))]
    if stored:
        raise ConfigError(
            f"{stage.name}: swap_chosen_rejected on rows with per-side columns {stored} would leave them on the wrong "
            "side: swap the plain rows (prompt, chosen, rejected)"
        )
    return dataset.rename_columns({"chosen": "rejected", "rejected": "chosen"})


def _reference(stage: Stage, trainer_cls) -> dict:
    """`ref_model=` for a preference trainer (loaded frozen, for TRL to place as it places any reference)."""
    import inspect

    cfg = stage.config
    if not cfg.ref_model:
        return {}
    if "ref_model" not in inspect.signature(trainer_cls.__init__).parameters:
        raise ConfigError(
            f"{stage.name}: ref_model has no effect with objective {cfg.objective!r} (its trainer takes no reference)"
        )
    from ..models import load_model

    kwargs = cfg.model_kwargs(trainable=False)
    return {"ref_model": load_model(cfg.ref_model, trainable=False, in_engine=True, merge_adapter=True, **kwargs)}


def _classes(cfg):
    if cfg.stage == "train":
        from ..objectives import objective

        return objective(cfg.objective)
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    return TrlSFTConfig, SFTTrainer


def _trainer_kwargs(stage: Stage) -> dict:
    """The trainer config keys: the stage's, with tokentrain's defaults: no tracker unless asked; bf16 only where the
    machine has it (TRL's default `bf16=True` fails on a CPU); at most 2 checkpoints kept; the model card and hub repo
    named after the stage's output folder (the trainer writes to `<output_dir>.tmp`)."""
    kwargs = {
        "report_to": "none",
        "logging_steps": 10,
        "save_total_limit": 2,
        "include_num_input_tokens_seen": "non_padding",  # tokens/s in the logs (one gathered count per micro-batch)
        **stage.trainer_kwargs,
    }
    if "bf16" not in kwargs and not kwargs.get("fp16"):
        kwargs["bf16"] = _bf16_supported()
    # transformers 5 names: activation_checkpointing (TRL's default: on); the old names only warn
    for old, new in RENAMED_TRAINER_KEYS:
        if old in kwargs:
            if new in kwargs and kwargs[new] != kwargs[old]:
                raise ConfigError(f"{stage.name}: {old} and {new} are the same setting; give one")
            kwargs[new] = kwargs.pop(old)
    kwargs.setdefault("activation_checkpointing", True)
    kwargs.setdefault("dataloader_pin_memory", _cuda())  # pinned memory needs an accelerator
    kwargs.setdefault("hub_model_id", Path(stage.config.output_dir).name)
    kwargs.setdefault("run_name", tracker_names(stage)[0])  # trackers: `<recipe>/<stage>`
    kwargs.pop("resume_from_checkpoint", None)  # honoured by _resume_point, not by TrainingArguments
    return kwargs


def _check_schedule(stage: Stage, args) -> None:
    """A run that would take no optimiser step is an error, not an untrained model marked complete."""
    if args.max_steps == 0 or (args.max_steps < 0 and args.num_train_epochs <= 0):
        raise ConfigError(
            f"{stage.name}: max_steps {args.max_steps} and num_train_epochs {args.num_train_epochs} give no training "
            "step: set max_steps > 0, or num_train_epochs > 0 with max_steps -1"
        )


def _resume_point(stage: Stage, tmp: Path) -> str | None:
    """The checkpoint to resume from: `resume_from_checkpoint` when given, else the last complete one in `tmp`.

    A checkpoint is complete once the Trainer wrote its trainer_state.json (the main process's last file) and, with
    several processes, every rank's RNG state; one cut short during saving is removed with a warning, and the run
    resumes from the one before it."""
    explicit = stage.trainer_kwargs.get("resume_from_checkpoint")
    if explicit:
        if not (Path(explicit) / "trainer_state.json").is_file():
            raise FileNotFoundError(f"{stage.name}: resume_from_checkpoint {explicit} is not a complete checkpoint")
        logger.info("%s: resuming from %s (resume_from_checkpoint)", stage.name, explicit)
        return str(explicit)
    steps = sorted(
        (p for p in tmp.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    processes = distributed_state().num_processes
    for ckpt in steps:
        # trainer_state.json is the main process's last file; the other ranks' RNG states may still be missing
        ranks = [ckpt / f"rng_state_{i}.pth" for i in range(processes)] if processes > 1 else []
        if (ckpt / "trainer_state.json").is_file() and all(r.is_file() for r in ranks):
            logger.info("%s: resuming from %s", stage.name, ckpt)
            return str(ckpt)
        logger.warning("%s: %s was cut short while saving (no trainer_state.json): removed", stage.name, ckpt)
        if distributed_state().is_main_process:
            shutil.rmtree(ckpt)
    distributed_state().wait_for_everyone()
    return None


def _check_saved_weights(folder: Path, model, saved_parameters=None) -> None:
    """The final save holds every weight (read back from its safetensors headers) before any checkpoint is deleted:
    a sharded state dict (FSDP's SHARDED_STATE_DICT) saves none through `save_model`, and the checkpoints would then
    be the only copy. Counts parameters: the adapter's trainable ones for a PEFT model, else all (tied once), or what
    the trainer's `saved_parameters(model)` says it saves (concept_heads: only the heads in phase heads, no head in
    the phase-2 model), in every safetensors file under `folder` outside the checkpoints."""
    from safetensors import safe_open

    files = sorted(
        p for p in folder.rglob("*.safetensors") if not p.relative_to(folder).parts[0].startswith("checkpoint-")
    )
    saved = 0
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                saved += n
    peft = hasattr(model, "peft_config")
    # ds_numel: a ZeRO-3 partitioned parameter's full size (its local numel is 0); FSDP2's DTensor gives the full size
    expected = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not peft)
    if saved_parameters is not None:
        expected = saved_parameters(model)
    if saved < expected:
        raise RuntimeError(
            f"the final save in {folder} holds {saved:,} parameters of the model's {expected:,} "
            f"({[f.name for f in files] or 'no safetensors file'}): the checkpoints are kept (resume with the same "
            "command). Under FSDP use fsdp_state_dict_type FULL_STATE_DICT (the shipped fsdp2.yaml does)."
        )


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def show_progress(trainer) -> None:
    """Replace Trainer's progress bar and metric printer with `TrainProgress` (one bar on a terminal, a line per ~10%
    in a file, metrics on one line each with tokens/s)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(TrainProgress())


class TrainProgress(TrainerCallback):
    """Training progress as a person reads it: on a terminal a tqdm bar with each log as one line above it; in a file
    (a SLURM .out) a line at every ~10% of the steps, left out where a log line (which carries the step, percentage
    and elapsed time) already fell in that tenth; on the main process only. Log lines read
    `step 30/200 (15%, 12 s): loss 1.23, grad_norm 1.4, learning_rate 0.0029, tokens/s 12,345, <metric> ...`."""

    def __init__(self):
        self.bar, self.next_mark, self.start = None, 1, 0.0
        self.last_mark, self.last_log = 0, -1

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()
        self.last_mark = self.last_log = state.global_step
        if state.is_world_process_zero and is_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="Training")

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            return
        step, total = state.global_step, state.max_steps
        if not total or step * 10 < self.next_mark * total:
            return
        self.next_mark = step * 10 // total + 1
        logs_now = str(args.logging_strategy) in ("steps", "IntervalStrategy.STEPS") and (
            (state.logging_steps and step % state.logging_steps == 0) or step == total
        )
        logged_since = self.last_log > self.last_mark
        self.last_mark = step
        if not (logs_now or logged_since) and self._elapsed() >= QUIET_SECONDS:
            logger.info(
                "training: step %d/%d (%d%%), %.0f s elapsed", step, total, 100 * step // total, self._elapsed()
            )

    def _elapsed(self) -> float:
        return time.time() - self.start

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        logs = dict(logs)
        speed = logs.pop("train_tokens_per_second", None)
        for key in (
            "epoch",
            "num_input_tokens_seen",
            "train_runtime",
            "train_samples_per_second",
            "train_steps_per_second",
            "total_flos",
        ):
            logs.pop(key, None)
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items()]
        if speed:
            parts.append(f"tokens/s {speed:,.0f}")
        step, total = state.global_step, state.max_steps
        if self.bar is not None:
            self.bar.write(f"step {step}/{total}: " + ", ".join(parts))
        else:
            self.last_log = step
            where = f"{100 * step // total}%, {self._elapsed():.0f} s" if total else f"{self._elapsed():.0f} s"
            logger.info("%s", f"step {step}/{total} ({where}): " + ", ".join(parts))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _peft_config(stage: Stage):
    cfg = stage.config
    given = [k for k in LORA_KEYS if k in stage.given]
    if not cfg.use_peft:
        if given:
            raise ConfigError(
                f"{stage.name}: {', '.join(given)} set but use_peft is false: add `use_peft: true` to train a LoRA "
                "adapter, or remove the LoRA keys to train every weight"
            )
        return None
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def _eval_split(stage: Stage, dataset):
    """(train rows, eval rows or None): `eval_holdout` keeps the last N rows apart; `dataset_test_split` reads a split."""
    from ..data import apply_templates, load_rows

    cfg = stage.config
    if cfg.eval_holdout and cfg.dataset_test_split:
        raise ConfigError(f"{stage.name}: give eval_holdout or dataset_test_split, not both")
    if cfg.dataset_test_split:
        if stage.trainer_kwargs.get("eval_strategy", "no") == "no":
            raise ConfigError(
                f"{stage.name}: dataset_test_split {cfg.dataset_test_split!r} is read only for evaluation during "
                "training: set eval_strategy (steps or epoch), or remove dataset_test_split"
            )
        rows = load_rows(cfg.dataset, cfg.dataset_test_split, cfg.dataset_config or None)
        return dataset, apply_templates(rows, cfg.prompt_template, cfg.completion_template)
    if not cfg.eval_holdout:
        return dataset, None
    if not 0 < cfg.eval_holdout < len(dataset):
        raise ConfigError(
            f"{stage.name}: eval_holdout {cfg.eval_holdout} must be between 1 and the {len(dataset)} rows - 1"
        )
    n = len(dataset) - cfg.eval_holdout
    logger.info("%s: %d training rows, the last %d held out for evaluation", stage.name, n, cfg.eval_holdout)
    return dataset.select(range(n)), dataset.select(range(n, len(dataset)))


def _drop_prompt_rows(dataset, tokenizer):
    """[s] + completion ids with labels on the completion: the text-only reference's training view."""
    from ..signals.ref_logps import reference_view

    def view(example, idx):
        v = reference_view(example, tokenizer, True, idx)
        return {"input_ids": v["input_ids"], "labels": v["labels"]}

    return dataset.map(view, with_indices=True, remove_columns=dataset.column_names, desc="drop_prompt view")


def _check_signal_meta(stage: Stage, tokenizer) -> None:
    from ..data import read_meta

    meta = read_meta(stage.config.dataset)
    if not meta:
        return
    if meta.get("vocab_size") is not None and meta["vocab_size"] != len(tokenizer):
        raise ValueError(
            f"{stage.name}: signals were scored for a vocabulary of {meta['vocab_size']} tokens but the policy "
            f"tokenizer has {len(tokenizer)}: they belong to another tokenizer"
        )
    scored_with = meta.get("tokenizer")
    if scored_with and Path(scored_with).is_dir():  # a local tokenizer: the same token for every id?
        from ..models import load_tokenizer

        theirs, ours = load_tokenizer(scored_with).get_vocab(), tokenizer.get_vocab()
        if theirs != ours:
            first = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda kv: kv[1])[:1]
            raise ValueError(
                f"{stage.name}: the signals in {stage.config.dataset} were scored with the tokenizer {scored_with}, "
                f"whose vocabulary differs from the policy's {stage.config.model} (e.g. {first}): rescore with the "
                "policy's tokenizer (score --tokenizer)"
            )
    if stage.trainer_kwargs.get("weighting") == "prior" and meta.get("drop_prompt") is False:
        logger.warning(
            "%s: weighting 'prior' on ref_logps scored with drop_prompt false: the reference saw the context, so its "
            "weights no longer single out context-related tokens",
            stage.name,
        )


class AccuracyStop(TrainerCallback):
    """Greedy accuracy of the model on `stop_dataset` every `stop_check_every` steps from `stop_check_from`; training
    stops at the first check reaching `stop_accuracy` (the mini experiment's base SFT: stop at dev >= 0.45)."""

    def __init__(self, cfg, tokenizer):
        from ..data import load_rows, prompt_ids
        from ..tasks.grading import GRADERS

        if cfg.stop_task not in GRADERS or not cfg.stop_dataset:
            raise ConfigError(f"stop_accuracy needs stop_dataset and stop_task (one of {sorted(GRADERS)})")
        self.cfg, self.tokenizer, self.grade = cfg, tokenizer, GRADERS[cfg.stop_task]
        self.rows = list(load_rows(cfg.stop_dataset))
        self.prompts = [prompt_ids(r, tokenizer) for r in self.rows]
        self.checks: list[dict] = []
        self.trackers: list = []  # the trainer's tracker callbacks (`tracker_callbacks`), set once it is built

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from ..models import generate
        from ..tasks.grading import accuracy

        step, cfg = state.global_step, self.cfg
        if step < cfg.stop_check_from or (step - cfg.stop_check_from) % cfg.stop_check_every:
            return control
        was_training = model.training
        texts = generate(model, self.tokenizer, self.prompts, cfg.stop_max_new_tokens, 256, progress=False)
        model.train(was_training)
        acc = accuracy(self.grade(t, str(r["gold"])) for t, r in zip(texts, self.rows))["accuracy"]
        self.checks.append({"step": step, "accuracy": acc})
        for tracker in self.trackers:  # as `eval/greedy_accuracy` at this step
            tracker.on_log(args, state, control, logs={"eval_greedy_accuracy": acc})
        logger.info(
            "step %d: greedy accuracy on %s %.3f (stop at %.3f)", step, cfg.stop_dataset, acc, cfg.stop_accuracy
        )
        if acc >= cfg.stop_accuracy:
            control.should_training_stop = True
        return control
