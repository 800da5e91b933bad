"""`ConceptHeadsTrainer`: concept-aware fine-tuning (CAFT) with auxiliary multi-token prediction heads.

Spec: specs/concept_heads.md. Paper: arXiv 2506.07833 (official code michaelchen-lab/caft-llm). A general auxiliary-
head trainer; CAFT is its default configuration (4 decoder-layer heads, alpha 0.8, beta 0.01, sine decay).

- phase `heads` (CAFT phase 1): the base is frozen and runs under no_grad; only `concept_heads.*` train, on
  L = sum_i alpha^i CE_i. Data: the base model's own samples (`signals/self_distill.py`, trained on the stored ids)
  or ordinary SFT rows (stage 02b: the task's ground-truth answers). Outputs hold only the heads (`<out>/heads/`).
- phase `finetune` (CAFT phase 2): L = CE_0 + beta * gamma(tau) * sum_i alpha^i CE_i with frozen heads loaded from
  `heads_path`; LoRA or full fine-tuning, lm_head and input embeddings frozen. The saved model is vanilla (no head
  key). beta = 0 builds no heads: exactly next-token SFT with the same trainable set (the NTP baseline).

The loss math is `losses/concept_heads.py`; the heads are `heads.py`. Per micro-batch: head targets from the labels
(`head_targets`, never stored), one forward through the wrapped model (TRL's fused LM head for CE_0, the capture hook
for the heads' inputs), each head's CE through TRL's chunked kernel one head after another, all inside the wrapped
model's forward (`_ForwardRedirection`, as TRL's DistillationTrainer) so DDP / ZeRO-3 / FSDP hooks fire. Each head has
its own global normaliser N_i: its valid targets over every micro-batch of the step and every process, counted once
before the forwards (`_get_num_items_in_batch`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTConfig

from ..heads import WEIGHTS_FILE, AuxHeads, AuxHeadsConfig, causal_lm, heads_state_from
from ..losses.concept_heads import IGNORE_INDEX, SCHEDULES, concept_heads_loss, head_targets, schedule_weight
from ..papers import PAPERS
from ..signals.self_distill import prepare_generated_dataset
from .base import _MODEL_KEYS, TokenSFTTrainer

logger = logging.getLogger(__name__)

PHASES = ("heads", "finetune")
FINETUNES = ("lora", "full")
# CAFT's LoRA (official scripts/train.py): r 8, alpha 16, dropout 0.1, every linear projection of the decoder layers.
DEFAULT_LORA = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.1,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
CE1_POOR_FIT = 4.0  # paper: warm the heads up on the task (stage 02b) when head 1's task CE exceeds 4
PREFIX = "concept_heads"


@dataclass
class ConceptHeadsConfig(SFTConfig):
    """`SFTConfig` plus the auxiliary heads. Fixed: loss_type 'nll', no label smoothing, bfd packing only. The LoRA
    hyper-parameters are TRL's `peft_config` (the train stage's `use_peft` / `lora_*` keys); `finetune: lora` without
    one uses CAFT's adapter (r 8, alpha 16, dropout 0.1, q/k/v/o/gate/up/down projections)."""

    phase: str | None = field(
        default=None,
        metadata={
            "help": "'heads' (phase 1: train only the heads, base frozen) or 'finetune' (phase 2: NTP + decaying "
            "head losses, heads frozen).",
            "choices": list(PHASES),
        },
    )
    num_aux_heads: int = field(
        default=4, metadata={"help": "H, the number of auxiliary heads (head i predicts t+1+i)."}
    )
    head_type: str = field(
        default="decoder_layer",
        metadata={
            "help": "'decoder_layer' (a copy of the last decoder layer on its input; CAFT/Gloeckle) or 'resblock' "
            "(Medusa: x + SiLU(Wx + b) on the last layer's output).",
            "choices": ["decoder_layer", "resblock"],
        },
    )
    alpha: float = field(default=0.8, metadata={"help": "Decay of the head losses: head i weighs alpha^i, in (0, 1]."})
    beta: float = field(
        default=0.01,
        metadata={"help": "Phase finetune: weight of the head term (>= 0); 0 builds no heads (the NTP baseline)."},
    )
    schedule: str = field(
        default="sine_decay",
        metadata={
            "help": "Phase finetune: gamma(tau) of the head term, 'sine_decay' (sin((1 - tau) pi / 2), 1 -> 0) or "
            "'constant'.",
            "choices": list(SCHEDULES),
        },
    )
    heads_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder of trained heads (heads.safetensors + concept_heads.json, a phase-heads run's "
            "<output_dir>/heads). Required in phase finetune with beta > 0; in phase heads, continue from them."
        },
    )
    finetune: str | None = field(
        default=None,
        metadata={
            "help": "Phase finetune: 'lora' (default) or 'full' (every base weight except lm_head and the input "
            "embeddings). Unset in phase heads.",
            "choices": list(FINETUNES),
        },
    )
    train_heads: bool = field(
        default=False,
        metadata={"help": "Phase finetune: train the heads too (in full); they are then saved to <output_dir>/heads."},
    )

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {list(PHASES)}, got {self.phase!r}")
        AuxHeadsConfig(self.num_aux_heads, self.head_type)  # validates both
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha <= 1):
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha!r}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.phase == "heads":
            if self.finetune == "lora":
                raise ValueError("LoRA is refused in phase heads: the base is frozen and only the heads train")
            if self.finetune is not None:
                raise ValueError(f"finetune {self.finetune!r} is for phase finetune; phase heads trains only the heads")
            if self.train_heads:
                raise ValueError("train_heads is for phase finetune; phase heads always trains the heads")
        else:
            if self.finetune is None:
                self.finetune = "lora"
            if self.finetune not in FINETUNES:
                raise ValueError(f"finetune must be one of {list(FINETUNES)}, got {self.finetune!r}")
            if self.beta > 0 and not self.heads_path:
                raise ValueError(
                    "phase finetune with beta > 0 needs heads_path: the folder of heads trained in phase heads "
                    "(<output_dir>/heads of that run); beta: 0 is the NTP baseline without heads"
                )
            if self.train_heads and self.beta == 0:
                raise ValueError("train_heads with beta 0: there are no heads (beta 0 is the NTP baseline)")
        super().__post_init__()


class ConceptHeadsTrainer(TokenSFTTrainer):
    """SFT with auxiliary multi-token heads (phase `heads` or `finetune`, see the module docstring)."""

    metric_prefix = PREFIX
    _tag_names = ["trl", "tokentrain", "concept_heads"]
    _name = "Concept-aware fine-tuning (CAFT)"
    _paper = PAPERS["concept_heads"]

    def __init__(self, model, args: ConceptHeadsConfig, *rest, peft_config=None, **kwargs):
        if isinstance(model, str):
            from trl.trainer.utils import create_model_from_path

            model = create_model_from_path(model, **dict(args.model_init_kwargs or {}))
        if hasattr(model, "peft_config"):
            raise ValueError(
                "pass the base model, not a PEFT model: the trainer attaches the heads first, then wraps the model "
                "(finetune: lora, or a peft_config)"
            )
        train_dataset = kwargs.get("train_dataset", rest[1] if len(rest) > 1 else None)
        self._check_schedule(args, train_dataset)
        self._vocab_size = model.get_input_embeddings().weight.shape[0]

        # Heads first: before PEFT wrapping (they take no LoRA) and before accelerate/DeepSpeed prepare.
        self.aux_heads: AuxHeads | None = None
        if args.phase == "heads" or args.beta > 0:
            wanted = AuxHeadsConfig(args.num_aux_heads, args.head_type)
            if args.heads_path:
                self.aux_heads = AuxHeads.load(model, args.heads_path, expected=wanted)
            else:
                self.aux_heads = AuxHeads.attach(model, wanted)
        self.num_heads = self.aux_heads.config.num_aux_heads if self.aux_heads is not None else 0

        if args.phase == "heads":
            if peft_config is not None:
                raise ValueError("LoRA is refused in phase heads: the base is frozen and only the heads train")
            model.requires_grad_(False)
            self.aux_heads.requires_grad_(True)
        elif args.finetune == "full":
            if peft_config is not None:
                raise ValueError("finetune 'full' with a peft_config: set finetune: lora to train an adapter")
            model.requires_grad_(True)
            _freeze_unembedding(model)
            if self.aux_heads is not None:
                self.aux_heads.requires_grad_(args.train_heads)
        else:
            if peft_config is None:
                from peft import LoraConfig

                peft_config = LoraConfig(task_type="CAUSAL_LM", bias="none", **DEFAULT_LORA)
            _resolve_default_targets(model, peft_config)
            _check_lora_targets(model, peft_config)
            self._user_exclude = peft_config.exclude_modules  # what the saved adapter_config.json carries
            peft_config = _exclude_heads(model, peft_config)

        try:
            super().__init__(
                model, args, *rest, peft_config=peft_config if args.phase == "finetune" else None, **kwargs
            )
        except Exception:
            if self.aux_heads is not None:  # leave the caller's model as it was given
                self.aux_heads.detach(model)
            raise

        if args.phase == "finetune" and args.finetune == "lora" and self.aux_heads is not None:
            self.aux_heads.requires_grad_(args.train_heads)  # PEFT froze every non-LoRA weight
        _check_frozen(self.model)
        from trl.models.utils import _ForwardRedirection

        self._forward_redirection = _ForwardRedirection()
        self._epoch_counts = torch.zeros(self.num_heads + 1, dtype=torch.long)
        self._fit_checked = False
        self.add_callback(_EmptyHeadWarning(self))

    # ---------------------------------------------------------------------------------------------------- setup

    @staticmethod
    def _check_schedule(args, train_dataset) -> None:
        if args.phase == "finetune" and args.beta > 0 and args.schedule == "sine_decay" and args.max_steps <= 0:
            if train_dataset is not None and not hasattr(train_dataset, "__len__"):
                raise ValueError(
                    "schedule 'sine_decay' needs the run's length: the dataset is iterable (no length), so set "
                    "max_steps, or use schedule 'constant'"
                )

    def _announce(self) -> None:
        super()._announce()
        a = self.args
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if a.phase == "heads":
            what = f"phase heads: {self.num_heads} {a.head_type} heads, loss sum_i {a.alpha}^i CE_i"
        elif self.aux_heads is None:
            what = f"phase finetune ({a.finetune}), beta 0: next-token loss only (the NTP baseline)"
        else:
            what = (
                f"phase finetune ({a.finetune}): CE_0 + {a.beta} * gamma(tau) * sum_i {a.alpha}^i CE_i, "
                f"{self.num_heads} {a.head_type} heads from {a.heads_path}, schedule {a.schedule}"
            )
        logger.info("%s; %d trainable parameters", what, trainable)

    # ----------------------------------------------------------------------------------------------------- data

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        columns = getattr(dataset, "column_names", None) or []
        if "prompt_ids" in columns and "completion_ids" in columns:  # generated rows: train on the stored ids
            dataset = prepare_generated_dataset(
                dataset,
                self._tokenizer,
                self._vocab_size,
                max_length=args.max_length,
                packing=packing,
                chat_template=self.chat_template,
                name=dataset_name,
            )
            return dataset.shuffle(seed=args.seed) if args.shuffle_dataset else dataset
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    # ----------------------------------------------------------------------------------------------- normaliser

    def _targets(self, batch) -> torch.Tensor:
        """(H + 1, B, T) head targets of a collated batch; packed or padding-free batches need `position_ids`."""
        position_ids = batch.get("position_ids")
        if (self.args.packing or self.args.padding_free) and position_ids is None:
            raise ValueError(
                "packed / padding-free batch without position_ids: head targets could cross document boundaries "
                "(use TRL's collator, which adds them, or pass position_ids)"
            )
        return head_targets(batch["labels"], self.num_heads, position_ids, batch.get("attention_mask"))

    def count_items(self, batch) -> torch.Tensor:
        """Valid targets of each head in one micro-batch.  (H + 1,)"""
        return (self._targets(batch) != IGNORE_INDEX).sum(dim=(1, 2))

    def _get_num_items_in_batch(self, batch_samples, device):
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        counts = sum(self.count_items(b) for b in batch_samples).to(device)  # (H + 1,)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts.unsqueeze(0)).sum(0)
        return counts

    def _gamma(self) -> float:
        """gamma(tau), tau = optimiser steps done / max_steps (constant inside one accumulation window)."""
        if self.args.schedule == "constant" or not self.state.max_steps:
            return schedule_weight(0.0, self.args.schedule)
        return schedule_weight(min(self.state.global_step / self.state.max_steps, 1.0), self.args.schedule)

    # ------------------------------------------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        targets = self._targets(inputs)  # (H + 1, B, T)
        local_counts = (targets != IGNORE_INDEX).sum(dim=(1, 2))  # (H + 1,)
        counts = num_items_in_batch if mode == "train" and num_items_in_batch is not None else local_counts
        counts = torch.as_tensor(counts, device=local_counts.device)
        if counts.dim() == 0:  # a caller's single count (Trainer's own, for prediction): next-token only
            counts = torch.cat([counts.reshape(1), local_counts[1:]])
        gamma = self._gamma() if self.args.phase == "finetune" else 1.0

        unwrapped = self.accelerator.unwrap_model(model)
        if unwrapped is model:
            loss, stats = self._loss_in_forward(model, inputs, targets, counts, gamma)
        else:  # inside the wrapper's forward, so DDP / ZeRO-3 / FSDP hooks fire
            loss, stats = self._forward_redirection(
                model, unwrapped, self._loss_in_forward, unwrapped, inputs, targets, counts, gamma
            )
        if mode == "train" and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        self._log_stats(stats, local_counts, gamma, mode)
        if mode == "eval" and self.args.phase == "finetune":
            loss = stats[0, 0] / local_counts[0].clamp(min=1)  # eval: the unweighted next-token NLL
        return (loss, types.SimpleNamespace(loss=loss, logits=None)) if return_outputs else loss

    def _loss_in_forward(self, model, inputs, targets, counts, gamma):
        """Runs inside the wrapped model's forward: backbone, heads and chunked CE. Returns (loss, stats (2, H + 1)):
        per-head NLL sums and top-1 hits, detached, for the metrics gathered after it returns."""
        model_inputs = {k: v for k, v in inputs.items() if k in _MODEL_KEYS}
        heads = self.aux_heads
        if self.args.phase == "heads":
            backbone = causal_lm(model).base_model
            backbone_inputs = {k: v for k, v in model_inputs.items() if k != "labels"}
            with torch.no_grad():  # the base is frozen: the heads' input is a constant
                heads.arm()
                try:
                    backbone(**backbone_inputs, use_cache=False)
                    capture = heads.read()
                finally:
                    heads.disarm()
            if any(getattr(h, "gradient_checkpointing", False) for h in heads.heads):
                # reentrant activation checkpointing gives no gradient to a layer whose input needs none
                capture.hidden_in.requires_grad_(True)
            sums, hits = heads.head_nll(model, capture, targets)  # (H,) each
            nll_sums = torch.cat([sums.new_zeros(1), sums])
            correct = torch.cat([hits.new_zeros(1), hits])
        else:
            if heads is not None:
                heads.arm()
            try:
                out = model(**model_inputs, use_cache=False, fused_lm_head=True)
                capture = heads.read() if heads is not None else None
            finally:
                if heads is not None:
                    heads.disarm()
            mask = targets[0][:, :-1] != IGNORE_INDEX  # (B, T-1) the fused head's frame
            nll_sums = (-out.log_probs).masked_fill(~mask, 0.0).sum().reshape(1)  # TRL's sum, masked identically
            correct = (out.is_top1 & mask).sum().reshape(1)
            if heads is not None:
                sums, hits = heads.head_nll(model, capture, targets)
                nll_sums = torch.cat([nll_sums, sums.to(nll_sums.dtype)])
                correct = torch.cat([correct, hits])
        loss, _ = concept_heads_loss(
            nll_sums,
            counts,
            self.args.alpha,
            self.args.beta,
            gamma,
            include_ntp=self.args.phase == "finetune",
        )
        stats = torch.stack([nll_sums.detach().float(), correct.float()])  # (2, H + 1)
        return loss, stats

    def _log_stats(self, stats, local_counts, gamma, mode) -> None:
        """Gathered after the forward (never inside the wrapped forward): ce_i, acc_i, count_i per micro-batch."""
        with torch.no_grad():
            rows = torch.cat([stats, local_counts.float().unsqueeze(0).to(stats.device)])  # (3, H + 1)
            rows = self.accelerator.gather_for_metrics(rows.unsqueeze(0)).sum(0)
            nll, hits, n = rows.cpu()
            metrics = self._metrics[mode]
            first = 1 if self.args.phase == "heads" else 0
            for i in range(first, self.num_heads + 1):
                metrics[f"{PREFIX}/count_{i}"].append(n[i].item())
                if n[i] > 0:
                    metrics[f"{PREFIX}/ce_{i}"].append((nll[i] / n[i]).item())
                    metrics[f"{PREFIX}/acc_{i}"].append((hits[i] / n[i]).item())
            if self.args.phase == "finetune" and self.aux_heads is not None:
                metrics[f"{PREFIX}/weight"].append(self.args.beta * gamma)
            if mode == "train":
                self._epoch_counts += n.long()

    def log(self, logs, start_time=None):
        super().log(logs, start_time)  # TRL adds the averaged metrics to `logs`
        key = f"{PREFIX}/ce_1"
        if self.args.phase == "finetune" and not self._fit_checked and key in logs:
            self._fit_checked = True
            if logs[key] > CE1_POOR_FIT:
                logger.warning(
                    "head 1's CE on the task is %.2f > %.1f at the first logged step: the heads fit this task poorly; "
                    "consider warming them up on the task's own answers first (stage 02b_heads_task, phase heads, "
                    "1 epoch), as the CAFT paper does",
                    logs[key],
                    CE1_POOR_FIT,
                )

    # ----------------------------------------------------------------------------------------------- saving

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        heads = self.aux_heads
        heads_state = heads_state_from(state_dict) if heads is not None and state_dict is not None else None
        if self.args.phase == "heads":  # only the heads: the frozen base is never re-saved
            if self.args.should_save:
                heads.save(Path(output_dir) / "heads", heads_state)
                torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
            return
        if heads is not None:  # a vanilla model: no concept_heads.* key
            if state_dict is None and not hasattr(self.model, "peft_config"):
                state_dict = self.accelerator.unwrap_model(self.model).state_dict()
            if state_dict is not None:
                state_dict = {k: v for k, v in state_dict.items() if f"{PREFIX}." not in k}
        adapter = getattr(self.model, "peft_config", {}).get("default")
        if adapter is None or heads is None:
            super()._save(output_dir, state_dict=state_dict)
        else:  # the adapter is saved for a vanilla base: without the heads' modules in exclude_modules
            excluded, adapter.exclude_modules = adapter.exclude_modules, self._user_exclude
            try:
                super()._save(output_dir, state_dict=state_dict)
            finally:
                adapter.exclude_modules = excluded
        if heads is not None and self.args.train_heads and self.args.should_save:
            heads.save(Path(output_dir) / "heads", heads_state)

    def saved_parameters(self, model) -> int:
        """Parameters the final save holds, for the train stage's check before it deletes the checkpoints: phase
        heads only the heads (`heads/`); phase finetune the vanilla model (every base weight, or the adapter's
        trainable ones for LoRA) plus the heads with `train_heads`. ZeRO-3 partitions count at full size."""

        def numel(params) -> int:
            return sum(getattr(p, "ds_numel", p.numel()) for p in params)

        heads = list(self.aux_heads.parameters()) if self.aux_heads is not None else []
        own = {id(p) for p in heads}
        base = [p for p in model.parameters() if id(p) not in own]
        if self.args.phase == "heads":
            return numel(heads)
        lora = hasattr(model, "peft_config")
        return numel(p for p in base if p.requires_grad or not lora) + (numel(heads) if self.args.train_heads else 0)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.args.phase == "heads":
            self.aux_heads.load_weights(Path(resume_from_checkpoint) / "heads" / WEIGHTS_FILE)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.aux_heads is not None and self.args.train_heads:
            self.aux_heads.load_weights(Path(resume_from_checkpoint) / "heads" / WEIGHTS_FILE)

    def _load_best_model(self):
        if self.args.phase == "heads":
            self.aux_heads.load_weights(Path(self.state.best_model_checkpoint) / "heads" / WEIGHTS_FILE)
            return
        super()._load_best_model()

    def _issue_warnings_after_load(self, load_result):
        # checkpoints of phase finetune hold no head weight (the heads come from heads_path): not a missing key
        missing = [k for k in load_result.missing_keys if f"{PREFIX}." not in k]
        super()._issue_warnings_after_load(
            types.SimpleNamespace(missing_keys=missing, unexpected_keys=load_result.unexpected_keys)
        )


class _EmptyHeadWarning(TrainerCallback):
    """A head with no valid target over a whole epoch (every sequence too short for it) gets a warning."""

    def __init__(self, trainer: ConceptHeadsTrainer):
        self.trainer = trainer

    def on_epoch_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        counts = trainer._epoch_counts
        first = 1 if trainer.args.phase == "heads" else 0
        empty = [i for i in range(first, trainer.num_heads + 1) if counts[i] == 0 and counts.sum() > 0]
        if empty:
            logger.warning(
                "epoch %s: heads %s had no valid target (every sequence is shorter than 2 + i tokens of answer for "
                "head i): they learnt nothing this epoch",
                round(state.epoch or 0),
                empty,
            )
        trainer._epoch_counts = torch.zeros_like(counts)
        return control


# -------------------------------------------------------------------------------------------- trainable sets


def _unembedding(model) -> list[tuple[str, torch.nn.Module]]:
    lm = causal_lm(model)
    wanted = {id(lm.get_output_embeddings()): "lm_head", id(lm.get_input_embeddings()): "input embeddings"}
    return [(name, module) for name, module in lm.named_modules() if id(module) in wanted]


def _freeze_unembedding(model) -> None:
    """Full fine-tuning trains every base weight except lm_head and the input embeddings (tied: frozen together)."""
    lm = causal_lm(model)
    lm.get_output_embeddings().requires_grad_(False)
    lm.get_input_embeddings().requires_grad_(False)


def _check_frozen(model) -> None:
    lm = causal_lm(model)
    for module in (lm.get_output_embeddings(), lm.get_input_embeddings()):
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(
                f"{type(module).__name__} weights {trainable} would train: concept_heads keeps lm_head and the input "
                "embeddings frozen (the heads read lm_head.weight)"
            )


def _resolve_default_targets(model, peft_config) -> None:
    """target_modules None: PEFT's default for the architecture (as get_peft_model would pick), resolved here so that
    the checks below see the modules it will adapt."""
    if peft_config.target_modules is not None:
        return
    from peft.tuners.lora.model import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(causal_lm(model).config.model_type)
    if default is not None:
        peft_config.target_modules = default if isinstance(default, str) else set(default)


def _check_lora_targets(model, peft_config) -> None:
    """LoRA must not reach lm_head, the input embeddings or the heads (they read the frozen unembedding)."""
    import copy

    from peft.tuners.tuners_utils import check_target_module_exists

    targets = peft_config.target_modules
    problems = []
    if PREFIX in str(targets) or PREFIX in str(getattr(peft_config, "modules_to_save", None) or ""):
        problems.append("concept_heads")
    bare = copy.copy(peft_config)
    bare.exclude_modules = None
    bare.modules_to_save = None
    to_save = getattr(peft_config, "modules_to_save", None) or []
    for name, _ in _unembedding(model):
        leaf = name.split(".")[-1]
        hit = targets != "all-linear" and targets is not None and bool(check_target_module_exists(bare, name))
        if hit or name in to_save or leaf in to_save:
            problems.append(name)
    if problems:
        raise ValueError(
            f"LoRA target_modules {targets!r} (modules_to_save {to_save or None}) match {problems}: lm_head and the "
            "input embeddings stay frozen and the concept heads take no LoRA; remove them from the targets"
        )


def _exclude_heads(model, peft_config):
    """Add the heads' modules to the adapter's `exclude_modules` (the default targets q_proj, ... match their layers
    too), only when some head module would otherwise be targeted."""
    import copy

    from peft.tuners.tuners_utils import check_target_module_exists

    lm = causal_lm(model)
    if PREFIX not in lm._modules:
        return peft_config
    names = [f"{PREFIX}.{n}" for n, m in lm._modules[PREFIX].named_modules() if n]
    bare = copy.copy(peft_config)
    bare.exclude_modules = None
    if peft_config.target_modules == "all-linear":
        hit = [n for n in names if isinstance(lm.get_submodule(n), torch.nn.Linear)]
    else:
        hit = [n for n in names if check_target_module_exists(bare, n)]
    if not hit:
        return peft_config
    existing = peft_config.exclude_modules
    if isinstance(existing, str):
        peft_config.exclude_modules = f"(?:{existing})|(?:{'|'.join(re.escape(n) for n in hit)})"
    else:
        peft_config.exclude_modules = [*(existing or []), *hit]
    return peft_config
