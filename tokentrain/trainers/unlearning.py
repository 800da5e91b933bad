"""`UnlearningTrainer`: WHP generic-label fine-tuning, with gradient ascent, NPO and SimNPO baselines.

Spec: specs/unlearning.md sections 2.6, 3 and 9. The loss math is in `losses/unlearning.py`; this file adapts a batch.
- `whp` (arXiv 2310.02238): NLL of the stored generic labels `target_ids` on the original text, positions with
  `token_weights` 0 excluded, normalised by the step's weighted-position count N_w. The fused head scores `labels`:
  the completion positions of the labels tensor are replaced by the target ids (-100 where the weight is 0), so TRL's
  fused head returns log pi(target_j | x_<j) with no change to the base trainer.
- `ga` (open-unlearning GradAscent): minus the mean NLL of the forget tokens, global token count.
- `npo` (arXiv 2404.05868): per-sequence log-ratio sums against stored `ref_logps`, global sequence count.
- `simnpo` (arXiv 2410.07163): per-sequence mean NLL, reference-free, global sequence count.
Optional retain term (ga, npo, simnpo): + retain_weight x token-mean NLL on a retain micro-batch of as many rows as the
forget micro-batch, drawn uniformly with replacement (seeded) at every micro-step; its token count is global too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from trl import SFTConfig

from ..data import load_rows, prepare_sft_dataset, require_columns
from ..losses.unlearning import count_sequences, ga_loss, mean_nll, npo_loss, simnpo_loss, whp_loss
from ..papers import PAPERS
from ..tokens import IGNORE_INDEX, segment_ids, target_mask
from .base import _MODEL_KEYS, TokenSFTTrainer

LOSSES = ("whp", "ga", "npo", "simnpo")
SIGNALS = {"whp": ("target_ids", "token_weights"), "ga": (), "npo": ("ref_logps",), "simnpo": ()}
WITH_RETAIN = ("ga", "npo", "simnpo")
# Where each signal comes from, for the error when it is missing.
WRITTEN_BY = {
    "target_ids": "the labels stage (`tokentrain score`, signal `whp_labels`: recipes/unlearning/*/02_labels)",
    "token_weights": "the labels stage (`tokentrain score`, signal `whp_labels`: recipes/unlearning/*/02_labels)",
    "completion_ids": "the score stage that wrote the signals (`tokentrain score`)",
    "ref_logps": "the reference stage (`tokentrain score`, signal `ref_logps` on the original model: "
    "recipes/unlearning/*/03_ref_logps)",
}
FLOAT_EXACT_IDS = 1 << 24  # token ids travel as float32 signal columns: exact below 2^24


@dataclass
class UnlearningConfig(SFTConfig):
    """`SFTConfig` plus the unlearning loss. Fixed: loss_type 'nll', no label smoothing, bfd packing only."""

    unlearning_loss: str | None = field(
        default=None,
        metadata={
            "help": "'whp' (NLL on the stored generic labels, Eldan & Russinovich 2023), 'ga' (gradient ascent), 'npo' "
            "(negative preference optimisation, stored ref_logps) or 'simnpo' (reference-free, length-normalised).",
            "choices": list(LOSSES),
        },
    )
    npo_beta: float = field(
        default=0.1, metadata={"help": "NPO beta (> 0); 0.1 as open-unlearning's NPO.yaml (its class default is 1.0)."}
    )
    simnpo_beta: float = field(
        default=2.5,
        metadata={
            "help": "SimNPO beta (> 0); 2.5 as the official TOFU forget05 script (OPTML-Group/Unlearn-Simple "
            "TOFU/config/forget.yaml and README: beta=2.5, 4.5 for forget10)."
        },
    )
    simnpo_gamma: float = field(
        default=0.0,
        metadata={
            "help": "SimNPO margin gamma, inside beta: sigmoid(beta (lbar - gamma)); 0.0 as the official script."
        },
    )
    retain_weight: float = field(
        default=0.0,
        metadata={
            "help": "lambda of the retain NLL term (ga, npo, simnpo; >= 0); 0 turns it off. open-unlearning's NPO uses "
            "1.0; GradAscent and WHP have none."
        },
    )
    retain_dataset: str | None = field(
        default=None,
        metadata={"help": "Retain rows (a local jsonl/json/csv file, saved dataset or hub name) for the retain term."},
    )

    def __post_init__(self):
        problems = []
        if self.unlearning_loss not in LOSSES:
            problems.append(f"unlearning_loss must be one of {list(LOSSES)}, got {self.unlearning_loss!r}")
        if not (math.isfinite(self.npo_beta) and self.npo_beta > 0):
            problems.append(f"npo_beta must be > 0, got {self.npo_beta!r}")
        if not (math.isfinite(self.simnpo_beta) and self.simnpo_beta > 0):
            problems.append(f"simnpo_beta must be > 0, got {self.simnpo_beta!r}")
        if not math.isfinite(self.simnpo_gamma):
            problems.append(f"simnpo_gamma must be finite, got {self.simnpo_gamma!r}")
        if not (math.isfinite(self.retain_weight) and self.retain_weight >= 0):
            problems.append(f"retain_weight must be a finite number >= 0, got {self.retain_weight!r}")
        elif self.retain_weight > 0 and not self.retain_dataset:
            problems.append(f"retain_weight is {self.retain_weight} but no retain_dataset is given")
        elif self.retain_weight > 0 and self.unlearning_loss == "whp":
            problems.append("retain_weight must be 0 with unlearning_loss 'whp' (the retain term is for ga/npo/simnpo)")
        if problems:
            raise ValueError("invalid unlearning settings:\n- " + "\n- ".join(problems))
        super().__post_init__()


class UnlearningTrainer(TokenSFTTrainer):
    """Unlearning on forget rows. `whp` rows carry `completion_ids`, `target_ids`, `token_weights` (the labels stage);
    `npo` rows `completion_ids` + `ref_logps`; `ga` and `simnpo` rows are plain prompt/completion rows.

    `retain_dataset` (a `Dataset`) overrides `args.retain_dataset` (a path or hub name, loaded with `load_rows`)."""

    metric_prefix = "unlearning"
    _tag_names = ["trl", "tokentrain", "unlearning"]
    _name = "Generic-label unlearning"
    _paper = PAPERS["unlearning"]

    def __init__(self, model, args: UnlearningConfig, *rest, retain_dataset: Dataset | None = None, **kwargs):
        loss = args.unlearning_loss
        self.signal_columns = SIGNALS[loss]
        train_dataset = kwargs.get("train_dataset", rest[1] if len(rest) > 1 else None)
        if self.signal_columns and train_dataset is not None:
            for column in (*self.signal_columns, "completion_ids"):  # the signal first: its hint names the stage
                require_columns(train_dataset, [column], hint=f"{column!r} is written by {WRITTEN_BY[column]}")
        if loss == "whp" and train_dataset is not None:
            _check_weights_not_all_zero(train_dataset)
        super().__init__(model, args, *rest, **kwargs)
        if loss == "whp" and train_dataset is not None:
            _check_target_ids(train_dataset, self.model)
        self._retain_rows = None
        if args.retain_weight > 0:
            retain = retain_dataset if retain_dataset is not None else load_rows(args.retain_dataset)
            self._retain_rows = prepare_sft_dataset(
                retain,
                self._tokenizer,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                chat_template=self.chat_template,
                name="retain",
            )
            if len(self._retain_rows) == 0:
                raise ValueError(f"the retain dataset {args.retain_dataset!r} has no row with a completion")
            seed = args.seed + 1_000_003 * self.accelerator.process_index
            self._retain_generator = torch.Generator().manual_seed(seed)
        self._retain_count = None
        self._retain_out = None

    # ----------------------------------------------------------------------------------------------- normaliser

    def count_items(self, batch):
        """N_w (whp: weighted targets), N (ga: valid targets) or S (npo, simnpo: sequences) of one micro-batch."""
        mask = target_mask(batch["labels"])  # (B, T-1)
        loss = self.args.unlearning_loss
        if loss == "whp" and "token_weights" in batch:
            return (mask & (batch["token_weights"][:, 1:] > 0)).sum()
        if loss in ("npo", "simnpo"):
            seg = segment_ids(batch.get("position_ids"), batch["labels"].shape, mask.device)[:, 1:]
            return count_sequences(mask, seg)
        return mask.sum()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also draws the step's retain micro-batches (one per forget micro-batch, as many rows) and counts their
        targets over every micro-batch and process: the retain term's global normaliser."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._retain_rows is None or not batch_samples:
            return batch_samples, num_items
        count = torch.zeros((), dtype=torch.long)
        for batch in batch_samples:
            seg = segment_ids(batch.get("position_ids"), batch["labels"].shape, "cpu")[:, 1:]
            n_rows = int(count_sequences(target_mask(batch["labels"]).cpu(), seg))
            picks = torch.randint(len(self._retain_rows), (max(n_rows, 1),), generator=self._retain_generator)
            retain = self.data_collator([self._retain_rows[int(i)] for i in picks])
            batch["retain"] = retain
            count += target_mask(retain["labels"]).sum()
        count = count.to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count.unsqueeze(0)).sum()
        self._retain_count = count
        return batch_samples, num_items

    # ------------------------------------------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        retain = inputs.pop("retain", None)
        if model.training and retain is not None:
            retain_inputs = {k: v for k, v in retain.items() if k in _MODEL_KEYS}
            out = model(**retain_inputs, use_cache=False, fused_lm_head=True)
            self._retain_out = (out.log_probs, out.label_mask)  # (B', T'-1) each
        if model.training and self.args.unlearning_loss == "whp":
            inputs["labels"] = generic_label_tensor(inputs["labels"], inputs["target_ids"], inputs["token_weights"])
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._retain_out = None

    def token_loss(self, logps, mask, signals, inputs, num_items):
        loss, metrics = getattr(self, f"_loss_{self.args.unlearning_loss}")(logps, mask, signals, inputs, num_items)
        if self._retain_out is not None:
            r_logps, r_mask = self._retain_out  # (B', T'-1) each
            loss = loss + self.args.retain_weight * mean_nll(r_logps, r_mask, self._retain_count)
            metrics["retain_nll"] = (-r_logps.detach().sum(), r_mask.sum())
        return loss, metrics

    def _loss_whp(self, logps, mask, signals, inputs, num_items):
        loss = whp_loss(logps, signals["token_weights"], mask, num_items)
        with torch.no_grad():  # share of trained positions whose generic label differs from the text
            changed = (signals["target_ids"] != inputs["input_ids"][:, 1:].to(logps.dtype)) & mask
        return loss, {"changed": (changed.sum(), mask.sum())}

    def _loss_ga(self, logps, mask, signals, inputs, num_items):
        return ga_loss(logps, mask, num_items), {}

    def _loss_npo(self, logps, mask, signals, inputs, num_items):
        seg = signals["segment_ids"]
        loss = npo_loss(logps, signals["ref_logps"], mask, seg, self.args.npo_beta, num_items)
        with torch.no_grad():  # mean Delta per sequence
            log_ratio = ((logps.detach() - signals["ref_logps"]) * mask).sum()
        return loss, {"log_ratio": (log_ratio, count_sequences(mask, seg))}

    def _loss_simnpo(self, logps, mask, signals, inputs, num_items):
        args = self.args
        return simnpo_loss(logps, mask, signals["segment_ids"], args.simnpo_beta, args.simnpo_gamma, num_items), {}


def generic_label_tensor(labels: torch.Tensor, target_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The labels the fused head scores for WHP: target ids where the row has a target of weight > 0, else -100.

    `target_ids` and `weights` are the expanded signal columns (B, T), laid out like `input_ids` (0.0 on prompt and
    padding); the head then returns log pi(target_j | x_<j) at t = j - 1 while the input stays the original text.
    """
    keep = (labels != IGNORE_INDEX) & (weights > 0)  # (B, T)
    return torch.where(keep, target_ids.round().long(), torch.full_like(labels, IGNORE_INDEX))


def _check_weights_not_all_zero(dataset) -> None:
    if not any(any(w > 0 for w in row) for row in dataset["token_weights"]):
        raise ValueError(
            "every token weight of the labels dataset is 0: nothing to train on (was the dictionary matched on other "
            "text, or every position unaligned?)"
        )


def _check_target_ids(dataset, model) -> None:
    """Every target id must be an integer id the model can predict (< its logit width)."""
    head = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_output_embeddings()
    vocab = getattr(head.weight, "ds_shape", head.weight.shape)[0]  # ZeRO-3: the local partition is empty
    if vocab > FLOAT_EXACT_IDS:
        raise ValueError(f"the model's vocabulary ({vocab}) is too large for float32 target_ids columns")
    for i, (targets, completion) in enumerate(zip(dataset["target_ids"], dataset["completion_ids"])):
        if len(targets) != len(completion):
            raise ValueError(
                f"row {i}: 'target_ids' has {len(targets)} values but 'completion_ids' has {len(completion)}"
            )
        for j, t in enumerate(targets):
            if not (float(t).is_integer() and 0 <= t < vocab):
                raise ValueError(
                    f"row {i}, column 'target_ids', position {j}: {t!r} is not a token id of the model (0..{vocab - 1})"
                )
