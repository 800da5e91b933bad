"""`CriticalDPOTrainer`: critical-token DPO, TRL 1.16's `DPOTrainer` with per-token weights on the log-ratios.

Paper: Lin et al., "Critical Tokens Matter", arXiv 2411.19943. Spec: specs/critical_dpo.md sections 2, 3 and 9.
The loss math is in `losses/critical_dpo.py`; this file carries the weights from the dataset to that function.

What changes against TRL's `DPOTrainer` (everything else, including the reference machinery, is TRL's):
1. `_prepare_dataset`: the stored `chosen_ids`/`rejected_ids` (and `prompt_ids` if present: the split the weights
   were scored on) are moved aside, TRL's own preparation tokenises the rows, then every row is checked against the
   stored ids and its weights are validated; weight columns the `weighting` does not use are dropped first (so TRL's
   precompute cache differs between weightings).
2. `CriticalDPOCollator` adds `weights` (2B, T) in `completion_mask`'s layout; `_set_signature_columns_if_needed`
   keeps the weight columns through Trainer's column pruning.
3. `compute_loss`: policy through the fused LM head, reference as TRL gets it, `token_weighted_dpo_loss`, then one
   global normaliser (`_get_num_items_in_batch`): pairs (`sequence`) or Σ B_m·P_m (`position_mean`) summed over the
   accumulation window and the processes, chosen tokens for the `rpo_alpha` NLL term. TRL's convention is kept: each
   process returns sum_local / N_global x num_processes, since DDP averages gradients.
4. `compute_ref_log_probs` (`precompute_ref_log_probs`, `sequence` only) returns the weighted sums Σ_p w_p·ℓ^ref_p.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import AutoProcessor, PreTrainedTokenizerBase
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import get_config_model_id, global_then_local_main_first, use_adapter

from ..data import check_alignment, check_pair_prompt, require_columns
from ..losses.critical_dpo import REDUCTIONS, token_weighted_dpo_loss
from ..papers import PAPERS

logger = logging.getLogger(__name__)

WEIGHTINGS = ("rejected", "both", "none")
# The weight columns each weighting reads (and keeps); the others are dropped before TRL sees the dataset.
WEIGHT_COLUMNS = {"rejected": ("rejected_weights",), "both": ("chosen_weights", "rejected_weights"), "none": ()}
ALL_WEIGHT_COLUMNS = ("chosen_weights", "rejected_weights")
SIDES = ("chosen", "rejected")
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")  # as TRL's preparation writes them; the score stage too
# Batch keys that are not model inputs.
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "weights"}
_ROW = "_critical_dpo_row"  # the input row index, kept through TRL's filter for error messages


def _stored(column: str) -> str:
    return f"_stored_{column}"


@dataclass
class CriticalDPOConfig(DPOConfig):
    """`DPOConfig` plus the token weighting. Fixed: loss_type ["sigmoid"], no TRL loss variants (spec section 9).

    Defaults follow the official code (`position_mean`, `rejected`, beta 0.1); the paper's form is
    `reduction="sequence"` with `beta=1.0`; DPO and RPO baselines are `weighting="none"` (+ `rpo_alpha`).
    """

    reduction: str = field(
        default="position_mean",
        metadata={
            "help": "'position_mean' (official code: one sigmoid per position, mean over every position of the padded "
            "micro-batch, prompt and padding included) or 'sequence' (paper: weighted log-ratios summed inside one "
            "sigmoid per pair).",
            "choices": list(REDUCTIONS),
        },
    )
    weighting: str = field(
        default="rejected",
        metadata={
            "help": "Which stored weights multiply the log-ratios: 'rejected' (rejected tokens by `rejected_weights`, "
            "chosen tokens 1), 'both' (also `chosen_weights`, the code's only_neg=False) or 'none' (all 1: plain "
            "DPO/RPO through the same code path).",
            "choices": list(WEIGHTINGS),
        },
    )
    normalisation: str = field(
        default="global",
        metadata={
            "help": "'global' (the step's summed loss divided once by its total count of units over every "
            "micro-batch and process: batch 4 x GA 1 = batch 1 x GA 4 = 2 processes x 2) or 'micro_batch' (the "
            "official code's TRL 0.9.6 loop: each micro-batch's mean, averaged over accumulation steps and "
            "processes; differs from 'global' when micro-batches hold different numbers of units, e.g. padded "
            "widths under position_mean). The rpo_alpha term follows the same choice.",
            "choices": ["global", "micro_batch"],
        },
    )
    rpo_alpha: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the unweighted NLL on the chosen completions (RPO), normalised by the global chosen-token "
            "count; None (default, as paper and code) turns it off. Must be >= 0."
        },
    )

    def __post_init__(self):
        problems = []
        if self.reduction not in REDUCTIONS:
            problems.append(f"reduction must be one of {list(REDUCTIONS)}, got {self.reduction!r}")
        if self.weighting not in WEIGHTINGS:
            problems.append(f"weighting must be one of {list(WEIGHTINGS)}, got {self.weighting!r}")
        if self.normalisation not in ("global", "micro_batch"):
            problems.append(f"normalisation must be 'global' or 'micro_batch', got {self.normalisation!r}")
        if self.rpo_alpha is not None and not (math.isfinite(self.rpo_alpha) and self.rpo_alpha >= 0):
            problems.append(f"rpo_alpha must be None (off) or a finite value >= 0, got {self.rpo_alpha!r}")
        if not self.beta > 0:
            problems.append(f"beta must be > 0, got {self.beta!r}")
        if problems:
            raise ValueError("invalid critical_dpo settings:\n- " + "\n- ".join(problems))
        super().__post_init__()  # loss_type -> list, pad_to_multiple_of 'auto' -> None or 128
        _refuse_unsupported(self)


def _refuse_unsupported(args: CriticalDPOConfig) -> None:
    """TRL options this loss does not implement are errors, each naming the field and its valid value."""
    problems = []
    if list(args.loss_type) != ["sigmoid"]:
        problems.append(
            f"loss_type must be ['sigmoid'], got {args.loss_type}: the token-weighted loss replaces TRL's loss "
            "variants; for RPO's NLL term set rpo_alpha"
        )
    if args.loss_weights is not None:
        problems.append(f"loss_weights must be None, got {args.loss_weights}; for RPO set rpo_alpha")
    if args.f_divergence_type != "reverse_kl":
        problems.append(f"f_divergence_type must be 'reverse_kl', got {args.f_divergence_type!r}")
    if args.ld_alpha is not None:
        problems.append(f"ld_alpha must be None (LD-DPO length weighting is not implemented), got {args.ld_alpha!r}")
    if args.use_weighting:
        problems.append("use_weighting must be False (WPO pair weighting is not implemented)")
    if args.label_smoothing != 0:
        problems.append(
            f"label_smoothing must be 0 (robust/conservative DPO is not implemented), got {args.label_smoothing!r}"
        )
    if args.sync_ref_model:
        problems.append("sync_ref_model must be False (the reference is fixed; precomputed sums would go stale)")
    if args.padding_free:
        problems.append("padding_free must be False (TRL 1.16's DPO has no padding-free path)")
    if args.reduction == "position_mean":
        if args.precompute_ref_log_probs:
            problems.append(
                "precompute_ref_log_probs must be False with reduction='position_mean', which needs per-token "
                "reference log-probs; use reduction='sequence' to precompute"
            )
        if args.pad_to_multiple_of is not None:
            problems.append(
                f"pad_to_multiple_of must be None with reduction='position_mean' (got {args.pad_to_multiple_of!r}): "
                "every padding column adds a log 2 unit, so padding would change the loss"
            )
        if args.max_length is not None and args.truncation_mode == "keep_end":
            problems.append(
                "truncation_mode must be 'keep_start' with reduction='position_mean' and a max_length: 'keep_end' cuts "
                "chosen and rejected rows by different amounts, so column p would pair different completion tokens"
            )
    if problems:
        raise ValueError("unsupported settings for critical_dpo:\n- " + "\n- ".join(problems))


@dataclass
class CriticalDPOCollator(DataCollatorForPreference):
    """TRL's preference collator plus `weights` (2B, T) float32 in `completion_mask`'s layout.

    Rows: the B chosen sequences, then the B rejected ones. Prompt positions 0; completion positions the stored weights
    (chosen 1.0 unless `weighting="both"`, everything 1.0 with `"none"`); right padding 0; each row cut with the same
    `max_length`/`truncation_mode` slice as its tokens. E.g. prompt [5, 6], rejected [7, 8] with weights [0.1, 0.9]:
    weights row [0, 0, 0.1, 0.9, 0, ...].
    """

    weighting: str = "rejected"

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        rows = []
        for side in SIDES:
            weighted = f"{side}_weights" in WEIGHT_COLUMNS[self.weighting]
            for ex in examples:
                completion = ex[f"{side}_weights"] if weighted else [1.0] * len(ex[f"{side}_ids"])
                rows.append([0.0] * len(ex["prompt_ids"]) + list(completion))
        if self.max_length is not None:  # the parent validated truncation_mode
            cut = (
                slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
            )
            rows = [r[cut] for r in rows]
        weights = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)  # (2B, T), padding 0
        for i, r in enumerate(rows):
            weights[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
        batch["weights"] = weights
        return batch


class CriticalDPOTrainer(DPOTrainer):
    """DPO with per-token weights on the log-ratios (spec section 3). Train (and eval) rows carry `prompt`, `chosen`,
    `rejected` and, unless `weighting="none"`, `chosen_ids`, `rejected_ids` and the weight columns written by
    `tokentrain score` (`signal: contrastive`). Pass an explicit `ref_model`, a PEFT model/config (adapter-off
    reference) or a model loadable from `config._name_or_path`, exactly as with TRL's `DPOTrainer`."""

    _tag_names = ["trl", "dpo", "tokentrain", "critical_dpo"]
    _name = "Critical-token DPO"
    _paper = PAPERS["critical_dpo"]
    # compute_loss divides by the step's global count, so Trainer must not divide by the accumulation steps again
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model,
        ref_model=None,
        args: CriticalDPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        **kwargs,
    ):
        if not isinstance(args, CriticalDPOConfig):
            raise TypeError(f"args must be a CriticalDPOConfig, got {type(args).__name__}")
        if data_collator is not None and not isinstance(data_collator, CriticalDPOCollator):
            raise ValueError("data_collator must be a CriticalDPOCollator: the loss needs its `weights`")
        # TRL builds its collator inside __init__, but its reference precompute (also inside __init__) already needs
        # the weights, so ours is built here, with the pad token TRL would pick.
        if processing_class is None:
            model_id = model if isinstance(model, str) else get_config_model_id(model.config)
            revision = (args.model_init_kwargs or {}).get("revision")
            processing_class = AutoProcessor.from_pretrained(
                model_id, revision=revision, trust_remote_code=args.trust_remote_code
            )
        if not isinstance(processing_class, PreTrainedTokenizerBase):
            raise ValueError("critical_dpo trains text models: processing_class must be a tokenizer, not a processor")
        if args.pad_token is not None:
            if args.pad_token not in processing_class.get_vocab():
                raise ValueError(f"pad_token {args.pad_token!r} is not in the tokenizer's vocabulary")
            processing_class.pad_token = args.pad_token
        elif processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        if data_collator is None:
            data_collator = CriticalDPOCollator(
                pad_token_id=processing_class.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
                weighting=args.weighting,
            )
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if self.aux_loss_enabled:
            raise ValueError(
                "router_aux_loss_coef must be 0.0 for critical_dpo: the MoE auxiliary loss is not normalised with "
                "the token-weighted loss"
            )
        self._announce()

    # ------------------------------------------------------------------------------------------------------- data

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        used = WEIGHT_COLUMNS[args.weighting]
        if not isinstance(dataset, Dataset):  # an IterableDataset: no row can be checked or counted in advance
            if used:
                raise ValueError(
                    f"the {dataset_name} dataset is a {type(dataset).__name__}: weights need a map-style Dataset, "
                    "where every row's ids are checked before training"
                )
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        unused = [c for c in ALL_WEIGHT_COLUMNS if c in dataset.column_names and c not in used]
        if unused:  # also changes the fingerprint, so TRL's precompute cache differs between weightings
            dataset = dataset.remove_columns(unused)
        dataset = _drop_empty_sides(dataset, processing_class, dataset_name)
        stored = []
        if used:
            stage = "`tokentrain score` with `signal: contrastive`" + (
                ", `score_chosen: true`" if "chosen_weights" in used else ""
            )
            hint = f"weighting={args.weighting!r} reads them from the {dataset_name} dataset; {stage} writes them"
            require_columns(dataset, ["chosen_ids", "rejected_ids", *used], hint=hint)
            if len(dataset) and isinstance(dataset[0]["chosen"], list):  # chat rows: one shared prompt per pair
                text_columns = [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]
                for i, example in enumerate(dataset.select_columns(text_columns)):
                    check_pair_prompt(example, i)
            # TRL's tokenisation writes prompt_ids/chosen_ids/rejected_ids: keep the stored ones aside
            stored = [c for c in ID_COLUMNS if c in dataset.column_names]  # prompt_ids is optional
            dataset = dataset.rename_columns({c: _stored(c) for c in stored})
        if _ROW not in dataset.column_names:
            dataset = dataset.add_column(_ROW, list(range(len(dataset))))
        before = dataset[_ROW]
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        _report_length_drops(dataset, before, args, dataset_name)
        if not used:
            return dataset.remove_columns(_ROW)

        tokenizer = self._tokenizer

        def check(example):
            row = example[_ROW]
            for column in stored:
                check_alignment(example[_stored(column)], example[column], row, column, tokenizer)
            for column in used:
                _check_weights(example[column], len(example[column.replace("_weights", "_ids")]), row, column)
            return {}

        with global_then_local_main_first():
            return dataset.map(
                check,
                remove_columns=[_ROW, *(_stored(c) for c in stored)],
                num_proc=args.dataset_num_proc,
                desc=f"Checking {dataset_name} ids and weights",
            )

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, *WEIGHT_COLUMNS[self.args.weighting]]

    def _announce(self) -> None:
        a = self.args
        if self.precompute_ref_logps:
            reference = "precomputed weighted sums"
        elif self.ref_model is not None:
            reference = "explicit ref_model"
        else:
            reference = "the policy with its PEFT adapter off (or TRL's 'ref' adapter)"
        logger.info(
            "%s: %d pairs, %d pairs per step = %d per device x %d accumulation x %d processes; reduction %s, "
            "weighting %s, beta %g, rpo_alpha %s, reference: %s",
            type(self).__name__,
            len(self.train_dataset) if isinstance(self.train_dataset, Dataset) else -1,
            a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size,
            a.per_device_train_batch_size,
            a.gradient_accumulation_steps,
            a.world_size,
            a.reduction,
            a.weighting,
            a.beta,
            a.rpo_alpha,
            reference,
        )

    # ------------------------------------------------------------------------------------------------- reference

    def _reference_logps(self, model, model_kwargs, labels):
        """Per-token reference log-probs (2B, T-1) as TRL gets them: `model` is the explicit reference, or the policy
        with its PEFT adapter off (TRL's "ref" adapter when it made one)."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            with adapter:
                return model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs

    def compute_ref_log_probs(self, model, inputs):
        """Weighted reference sums Σ_p w_p·ℓ^ref_p per row, (B,) chosen and (B,) rejected: what TRL's precompute
        stores as `ref_chosen_logps`/`ref_rejected_logps`. Weights 1 (`weighting="none"`): TRL's plain sums."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        with self.accelerator.autocast():
            ref_logps = self._reference_logps(model, model_kwargs, labels)
        mask = completion_mask[:, 1:].bool()  # (2B, P)
        ref_logps = ref_logps[:, -mask.size(1) :]  # prompt-learning PEFT prepends virtual tokens
        zero = ref_logps.new_zeros(())
        weights = torch.where(mask, inputs["weights"][:, 1:].to(ref_logps.dtype), zero)  # the loss's own masking
        return (weights * torch.where(mask, ref_logps, zero)).sum(dim=1).chunk(2)

    # ------------------------------------------------------------------------------------------------ normaliser

    def _count_units(self, batch) -> torch.Tensor:
        """(units, chosen completion tokens) of one micro-batch: units are pairs (`sequence`) or B·P (`position_mean`,
        P = the padded width - 1, every column of the padded micro-batch is a unit)."""
        num_rows, width = batch["input_ids"].shape
        pairs = num_rows // 2
        units = pairs if self.args.reduction == "sequence" else pairs * (width - 1)
        chosen_tokens = batch["completion_mask"][:pairs, 1:].sum()
        return torch.stack([torch.as_tensor(units, device=chosen_tokens.device), chosen_tokens])

    def _get_num_items_in_batch(self, batch_samples, device):
        """The step's normalisers, summed over the accumulation window and (with average_tokens_across_devices)
        the processes: a (2,) tensor (units, chosen tokens), passed to `compute_loss` as `num_items_in_batch`."""
        if not batch_samples or "completion_mask" not in batch_samples[0]:
            return None
        counts = sum(self._count_units(b).to(device) for b in batch_samples)  # (2,)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts.unsqueeze(0)).sum(0)
        return counts

    # ------------------------------------------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        weights = inputs.pop("weights")[:, 1:]  # (2B, P) in the fused head's shifted frame
        completion_mask = inputs["completion_mask"]  # (2B, T)
        mask = completion_mask[:, 1:]  # (2B, P)
        num_cols = mask.size(1)
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)  # (2B, T)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        logps = outputs.log_probs[:, -num_cols:]  # (2B, P), zero where masked

        if self.precompute_ref_logps:  # `sequence` only (config): (2B,) weighted sums
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(logps.device)
        else:
            ref_model = self.ref_model if self.ref_model is not None else self.model
            ref_logps = self._reference_logps(ref_model, model_kwargs, labels)[:, -num_cols:]  # (2B, P)

        out = token_weighted_dpo_loss(
            logps, ref_logps, mask, weights, self.beta, self.args.reduction, rpo_alpha=self.args.rpo_alpha
        )
        if self.args.normalisation == "micro_batch" and model.training:
            # the official loop: this micro-batch's mean, / GA by the Trainer of its time; DDP averages the processes
            loss = out.loss / self.args.gradient_accumulation_steps
        else:
            counts = num_items_in_batch if num_items_in_batch is not None else self._count_units(inputs)
            loss = out.loss_sum / counts[0]
            if out.nll_sum is not None:
                loss = loss + self.args.rpo_alpha * out.nll_sum / counts[1].clamp(min=1)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages the processes' gradients

        self._log_metrics(inputs, outputs, logps, ref_logps, mask, weights, out)
        if return_outputs:  # TRL's deprecated path: logits for compute_metrics, recomputed with a plain forward
            warnings.warn(
                "`return_outputs=True` recomputes the logits with an extra forward pass (as TRL's DPOTrainer).",
                FutureWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _log_metrics(self, inputs, outputs, logps, ref_logps, mask, weights, out) -> None:
        """TRL's DPO metrics (unweighted, comparable with DPO runs) and `critical_dpo/*`.

        With precomputed reference sums and weights, the unweighted reference sums do not exist, so `rewards/*` are
        then the weighted ones (β·Σ w·Δ per row); everything else is unchanged.
        """
        mode = "train" if self.model.training else "eval"
        acc, metrics = self.accelerator, self._metrics[mode]
        num_cols = mask.size(1)
        mask = mask.bool()
        chosen_mask, rejected_mask = mask.chunk(2)  # (B, P) each

        def ratio(total, count):  # gathered sum / gathered count, as TRL computes its token means
            total, count = acc.gather_for_metrics(total).sum(), acc.gather_for_metrics(count).sum()
            return (total / count).item() if count > 0 else 0.0

        with torch.no_grad():
            entropy = outputs.entropy[:, -num_cols:]
            metrics["entropy"].append(ratio((entropy * mask).sum(), mask.sum()))
            if mode == "train":
                num_tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += num_tokens // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]
            chosen_logits, rejected_logits = outputs.mean_logits[:, -num_cols:].chunk(2)
            metrics["logits/chosen"].append(ratio(chosen_logits[chosen_mask].sum(), chosen_mask.sum()))
            metrics["logits/rejected"].append(ratio(rejected_logits[rejected_mask].sum(), rejected_mask.sum()))
            chosen_top1 = outputs.is_top1[:, -num_cols:].chunk(2)[0]
            metrics["mean_token_accuracy"].append(ratio((chosen_top1 & chosen_mask).sum(), chosen_mask.sum()))

            seq_logps = logps.detach().sum(dim=1)  # (2B,) unweighted, TRL's order of operations
            if ref_logps.dim() == 2:
                rewards = self.beta * (seq_logps - ref_logps.sum(dim=1))
                chosen_rewards, rejected_rewards = rewards.chunk(2)
            elif self.args.weighting == "none":  # precomputed sums with weights 1: TRL's plain sums
                chosen_rewards, rejected_rewards = (self.beta * (seq_logps - ref_logps)).chunk(2)
            else:
                chosen_rewards, rejected_rewards = out.chosen_rewards, out.rejected_rewards
            chosen_logps, rejected_logps = seq_logps.chunk(2)
            metrics["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
            metrics["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
            metrics["rewards/accuracies"].append(acc.gather((chosen_rewards > rejected_rewards).float()).mean().item())
            metrics["rewards/margins"].append(acc.gather(chosen_rewards - rejected_rewards).mean().item())
            metrics["logps/chosen"].append(acc.gather(chosen_logps).mean().item())
            metrics["logps/rejected"].append(acc.gather(rejected_logps).mean().item())

            metrics["critical_dpo/weighted_margin"].append(acc.gather(out.margins).mean().item())
            rejected_weights = weights.chunk(2)[1].float()
            metrics["critical_dpo/rejected_weight_mean"].append(
                ratio(rejected_weights[rejected_mask].sum(), rejected_mask.sum())
            )
            if out.nll_sum is not None:
                metrics["critical_dpo/nll"].append(ratio(out.nll_sum.detach(), out.num_nll_tokens))


def _check_weights(values, num_ids: int, row: int, column: str) -> None:
    """A row's weights: one per stored id, each finite and in [0, 1]; the error names row, side, position, value."""
    side, ids_column = column.split("_")[0], column.replace("_weights", "_ids")
    if values is None or len(values) != num_ids:
        n = None if values is None else len(values)
        raise ValueError(f"row {row}: column {column!r} has {n} values but {ids_column!r} has {num_ids} tokens")
    for j, v in enumerate(values):
        if v is None or not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise ValueError(
                f"row {row}, column {column!r} ({side} side), position {j}: weight {v!r} must be finite and in [0, 1]"
            )


def _is_empty(text, eos: str) -> bool:
    if isinstance(text, list):  # chat messages
        return all(not (m.get("content") if isinstance(m, dict) else m) for m in text)
    return text in ("", eos)


def _drop_empty_sides(dataset: Dataset, tokenizer, name: str) -> Dataset:
    """Pairs whose chosen or rejected response is empty (TRL would train the EOS alone as that response) are dropped
    and counted, as weighted_ntp drops empty completions."""
    eos = tokenizer.eos_token
    if _ROW not in dataset.column_names:
        dataset = dataset.add_column(_ROW, list(range(len(dataset))))
    empty = [
        i
        for i, (c, r) in enumerate(zip(dataset["chosen"], dataset["rejected"]))
        if _is_empty(c, eos) or _is_empty(r, eos)
    ]
    if not empty:
        return dataset
    if len(empty) == len(dataset):
        raise ValueError(f"{name}: every one of the {len(dataset)} pairs has an empty chosen or rejected response")
    logger.warning(
        "%s: %d of %d pairs have an empty chosen or rejected response and are dropped; first rows: %s",
        name,
        len(empty),
        len(dataset),
        empty[:10],
    )
    drop = set(empty)
    return dataset.select([i for i in range(len(dataset)) if i not in drop])


def _report_length_drops(dataset: Dataset, before: list[int], args, name: str) -> None:
    """TRL drops pairs whose prompt alone fills `max_length` (keep_start truncation): count them, name the first
    (`before`: the input row of each pair handed to TRL), and refuse when none is left (PyTorch would only say
    num_samples=0)."""
    dropped = sorted(set(before) - set(dataset[_ROW]))
    if not dropped:
        return
    first = dropped[:10]
    if not len(dataset):
        raise ValueError(
            f"{name}: all {len(before)} pairs were dropped because their prompt alone fills max_length={args.max_length}: "
            "raise max_length (or max_prompt_length in the score stage)"
        )
    logger.warning(
        "%s: %d of %d pairs dropped: their prompt alone fills max_length=%s; first rows: %s",
        name,
        len(dropped),
        len(before),
        args.max_length,
        first,
    )
