"""Shared plumbing of the SFT-style token-level trainers: signals in, fused-head log-probs out, one global normaliser.

`TokenSFTTrainer` is TRL 1.16's `SFTTrainer` with three changes, and no loss math:
1. dataset preparation carries token-aligned signal columns (`data.prepare_sft_dataset`: TRL's own tokenisation,
   alignment checked against the stored ids, signals cut with the tokens, bfd packing keeps them) and the collator
   lays them out like `input_ids`;
2. the step's normaliser is counted once, before the forwards, over every gradient-accumulation micro-batch and every
   process (`count_items`, default: valid targets, exactly TRL's `num_items_in_batch`);
3. `compute_loss` runs the fused LM head (per-token log-probs, never `[B, T, V]` logits) and hands the log-probs, the
   target mask and the shifted signals to the subclass's `token_loss`, which calls a pure function from `losses/`.

TRL's convention is kept: each process returns sum_local / D_global x P per micro-batch, since DDP averages gradients.
Evaluation returns the unweighted mean NLL, comparable across objectives and with plain SFT.
"""

from __future__ import annotations

import logging

import torch
from trl import SFTConfig, SFTTrainer

from ..data import SignalCollator, prepare_sft_dataset
from ..tokens import segment_ids, target_mask

logger = logging.getLogger(__name__)

# The forward takes these; signal columns and bookkeeping stay out of it.
_MODEL_KEYS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "labels",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
    "seq_idx",
)


class TokenSFTTrainer(SFTTrainer):
    """Base of `WeightedNTPTrainer` and the other SFT-style objectives. Subclasses set `signal_columns` (from their
    config) before calling `__init__`, and implement `token_loss`."""

    signal_columns: tuple[str, ...] = ()
    metric_prefix: str = "token"

    def __init__(self, *args, **kwargs):
        sft_args: SFTConfig = kwargs.get("args") if "args" in kwargs else args[1]
        _refuse_unsupported(sft_args)
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func is not supported: the objective's token_loss is the loss")
        super().__init__(*args, **kwargs)
        # TRL builds its own collator (it refuses a custom one with padding-free); add the signals to it.
        collator = self.data_collator
        self.data_collator = SignalCollator(
            pad_token_id=collator.pad_token_id,
            padding_free=collator.padding_free,
            pad_to_multiple_of=collator.pad_to_multiple_of,
            signal_columns=self.signal_columns,
        )
        # The loss is divided by the step's global count, so Trainer must not divide by the accumulation steps again.
        self.loss_is_scaled_for_ga = True
        self._pending_metrics: dict[str, torch.Tensor] = {}  # name -> (sum, count) on the device, until `log`
        self._announce()

    # ---------------------------------------------------------------------------------------------------- data

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        from datasets import Dataset

        if not isinstance(dataset, Dataset):
            raise ValueError(
                f"the {dataset_name} dataset is a {type(dataset).__name__} (streaming): tokentrain needs a map-style "
                "Dataset, whose every row is tokenised and checked against its stored ids before training"
            )
        if "input_ids" in dataset.column_names:
            raise ValueError(
                f"the {dataset_name} dataset is already tokenised (has 'input_ids'); tokentrain tokenises rows itself "
                "so that it can check signal alignment: pass prompt/completion, messages or text rows"
            )
        if formatting_func is not None:
            raise ValueError("formatting_func is not supported: format rows into prompt/completion before training")
        signals = self.signal_columns if dataset_name == "train" else ()
        dataset = prepare_sft_dataset(
            dataset,
            self._tokenizer,
            signal_columns=signals,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            packing=packing,
            chat_template=self.chat_template,
            name=dataset_name,
            assistant_only_loss=args.assistant_only_loss,
        )
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "labels", "seq_lengths", *self.signal_columns]

    def _announce(self) -> None:
        a = self.args
        per_step = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
        n_rows = len(self.train_dataset) if self.train_dataset is not None else 0
        logger.info(
            "%s: %d training rows (%s), %d sequences per step = %d per device x %d accumulation x %d processes, "
            "signals %s",
            type(self).__name__,
            n_rows,
            "bfd-packed" if a.packing else ("padding-free" if a.padding_free else "padded"),
            per_step,
            a.per_device_train_batch_size,
            a.gradient_accumulation_steps,
            a.world_size,
            list(self.signal_columns) or "none",
        )

    # ----------------------------------------------------------------------------------------------- normaliser

    def count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The micro-batch's share of the step normaliser: valid targets (TRL's `num_items_in_batch`)."""
        return target_mask(batch["labels"]).sum()

    def _get_num_items_in_batch(self, batch_samples, device):
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        count = sum(self.count_items(b) for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def normaliser_spans_processes(self) -> bool:
        """Whether the count from `_get_num_items_in_batch` is summed over the processes (then each process's loss
        is scaled by their number, against DDP's gradient average); TRL's rule: only with
        average_tokens_across_devices. A subclass whose count is always global says so."""
        return self.args.average_tokens_across_devices

    # ------------------------------------------------------------------------------------------------------ loss

    def token_loss(self, logps, mask, signals, inputs, num_items):
        """Return (loss, metrics) for one micro-batch: loss = sum over local tokens / num_items (the global count).

        logps, mask and every signal are in the fused head's frame (B, T-1); `metrics` maps a name to a
        (sum, count) pair of local tensors, gathered and logged as sum/count under `<metric_prefix>/<name>`.
        """
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs = {k: v for k, v in inputs.items() if k in _MODEL_KEYS}
        outputs = model(**model_inputs, use_cache=False, fused_lm_head=True)
        logps = outputs.log_probs  # (B, T-1), zero where no target
        mask = outputs.label_mask  # (B, T-1)
        if not model.training:  # eval: the unweighted mean NLL
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        signals = {c: inputs[c][:, 1:].to(logps.dtype) for c in self.signal_columns}  # (B, T-1) each
        signals["segment_ids"] = segment_ids(inputs.get("position_ids"), inputs["labels"].shape, logps.device)[:, 1:]
        if num_items_in_batch is None:
            num_items_in_batch = self.count_items(inputs)
        loss, metrics = self.token_loss(logps, mask, signals, inputs, num_items_in_batch)
        if self.normaliser_spans_processes():
            loss = loss * self.accelerator.num_processes  # DDP averages the gradients of a count over every process

        with torch.no_grad():
            metrics["nll"] = (-logps.detach().sum(), mask.sum())
            for name, (total, count) in metrics.items():  # summed on the device until the next log
                pair = torch.stack([torch.as_tensor(total, dtype=torch.float32), torch.as_tensor(count).float()])
                pending = self._pending_metrics.get(name)
                pair = pair.to(logps.device)
                self._pending_metrics[name] = pair if pending is None else pending + pair
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        """Every `<metric_prefix>/<name>` of the logging window: one gather of all (sum, count) pairs and one host
        transfer per log, not one per metric and micro-batch; logged as Σsum / Σcount over the window and processes.
        Trainer calls `log` on every process at the same steps."""
        pending, self._pending_metrics = self._pending_metrics, {}
        if pending:
            names = sorted(pending)
            stacked = torch.stack([pending[n] for n in names])  # (M, 2)
            totals = self.accelerator.gather_for_metrics(stacked.unsqueeze(0)).sum(0).tolist()  # one transfer
            for name, (total, count) in zip(names, totals):
                if count > 0:
                    self._metrics["train"][f"{self.metric_prefix}/{name}"] = [total / count]
        super().log(logs, start_time)


def _refuse_unsupported(args: SFTConfig) -> None:
    """Settings that would silently change what the token-level loss means are errors, each saying why."""
    problems = []
    if args.loss_type != "nll":
        problems.append(f"loss_type={args.loss_type!r}: token-level objectives replace the loss; use 'nll'")
    if getattr(args, "label_smoothing_factor", 0.0):
        problems.append("label_smoothing_factor needs full logits and changes the per-token NLL; set it to 0")
    if args.completion_only_loss is False:
        problems.append("completion_only_loss=False would train on prompts, which carry no signal")
    if (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
        problems.append(
            "dataset_kwargs={'skip_prepare_dataset': True} would skip the tokenisation that checks the stored ids "
            "and places each signal on its token: pass prompt/completion, messages or text rows instead"
        )
    if args.packing and args.packing_strategy != "bfd":
        problems.append(
            f"packing_strategy={args.packing_strategy!r} splits sequences, breaking per-sequence normalisation and "
            "ranking; use 'bfd'"
        )
    if problems:
        raise ValueError("unsupported settings:\n- " + "\n- ".join(problems))
