"""`WeightedNTPTrainer`: importance-weighted next-token prediction (PRIOR, Rho-1, user weights).

Spec: specs/weighted_ntp.md. The loss math is in `losses/weighted_ntp.py`; this file builds its inputs from a batch.
- `prior` (arXiv 2505.08971): w = (1 - P_ref)^alpha rescaled to mean 1 per sequence, from stored `ref_logps`.
- `rho1` (arXiv 2404.07965): train on the top rho share of tokens by excess loss L_theta - L_ref.
- `column`: per-token `token_weights` from the dataset (all ones = plain SFT, exactly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import SFTConfig

from ..losses.weighted_ntp import prior_weights, rho1_loss, rho1_num_selected, rho1_select, weighted_nll
from ..papers import PAPERS
from ..tokens import target_mask
from .base import TokenSFTTrainer

WEIGHTINGS = ("prior", "rho1", "column")
RHO1_SCOPES = ("micro_batch", "global")
SIGNALS = {"prior": ("ref_logps",), "rho1": ("ref_logps",), "column": ("token_weights",)}


@dataclass
class WeightedNTPConfig(SFTConfig):
    """`SFTConfig` plus the weighting. Fixed: loss_type 'nll', no label smoothing, bfd packing only."""

    weighting: str | None = field(
        default=None,
        metadata={
            "help": "Per-token weighting: 'prior' (1 - P_ref, mean 1 per sequence), 'rho1' (top-rho excess "
            "loss selection) or 'column' (the dataset's `token_weights`).",
            "choices": list(WEIGHTINGS),
        },
    )
    prior_alpha: float = field(default=1.0, metadata={"help": "PRIOR exponent: u = (1 - P_ref)^alpha (> 0)."})
    rho1_ratio: float = field(
        default=0.6, metadata={"help": "Rho-1 share of tokens trained on, in (0, 1] (paper: 0.6 at 1B, 0.7 at 7B)."}
    )
    rho1_scope: str = field(
        default="micro_batch",
        metadata={
            "help": "Rho-1 ranking scope: 'micro_batch' (each process ranks its own micro-batch) or 'global' "
            "(processes rank the union of their micro-batches at each micro-step).",
            "choices": list(RHO1_SCOPES),
        },
    )

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {self.weighting!r}")
        if not self.prior_alpha > 0:
            raise ValueError(f"prior_alpha must be > 0, got {self.prior_alpha}")
        if not 0 < self.rho1_ratio <= 1:
            raise ValueError(f"rho1_ratio must be in (0, 1], got {self.rho1_ratio}")
        if self.rho1_scope not in RHO1_SCOPES:
            raise ValueError(f"rho1_scope must be one of {list(RHO1_SCOPES)}, got {self.rho1_scope!r}")
        super().__post_init__()


class WeightedNTPTrainer(TokenSFTTrainer):
    """SFT with per-token weights. Train rows carry `completion_ids` + `ref_logps` (prior, rho1) or `token_weights`
    (column), written by `tokentrain score` or by the user."""

    metric_prefix = "weighted_ntp"
    _tag_names = ["trl", "sft", "tokentrain", "weighted_ntp"]
    _name = "Weighted NTP"

    def __init__(self, model, args: WeightedNTPConfig, *rest, **kwargs):
        self.signal_columns = SIGNALS[args.weighting]
        self._paper = PAPERS["rho1" if args.weighting == "rho1" else "prior"]  # the model card's citation
        super().__init__(model, args, *rest, **kwargs)

    # Rho-1 divides by the number of selected tokens, D, counted from labels alone before the forwards.
    def count_items(self, batch):
        n = target_mask(batch["labels"]).sum()
        if self.args.weighting != "rho1":
            return n
        return torch.tensor(rho1_num_selected(self.args.rho1_ratio, int(n)))

    def _get_num_items_in_batch(self, batch_samples, device):
        if not self._rho1_global():
            return super()._get_num_items_in_batch(batch_samples, device)
        # global: D = sum over micro-steps of ceil(rho * N summed over processes)
        counts = torch.stack([target_mask(b["labels"]).sum() for b in batch_samples]).to(device)  # (GA,)
        counts = self.accelerator.gather(counts.unsqueeze(0)).sum(0)  # (GA,) summed over processes
        return torch.tensor(sum(rho1_num_selected(self.args.rho1_ratio, int(n)) for n in counts), device=device)

    def normaliser_spans_processes(self) -> bool:
        # Rho-1's global ranking always gathers the selected count, whatever average_tokens_across_devices says
        return super().normaliser_spans_processes() or self._rho1_global()

    def _rho1_global(self) -> bool:
        return self.args.weighting == "rho1" and self.args.rho1_scope == "global" and self.args.world_size > 1

    def token_loss(self, logps, mask, signals, inputs, num_items):
        return getattr(self, f"_loss_{self.args.weighting}")(logps, mask, signals, num_items)

    def _loss_column(self, logps, mask, signals, num_items):
        weights = signals["token_weights"]  # (B, T-1)
        loss = weighted_nll(logps, weights, mask, num_items)
        return loss, {"weight_max": (_masked_max(weights, mask), torch.tensor(1.0))}

    def _loss_prior(self, logps, mask, signals, num_items):
        ref_logps = signals["ref_logps"]  # (B, T-1)
        weights = prior_weights(ref_logps, mask, signals["segment_ids"], self.args.prior_alpha)
        loss = weighted_nll(logps, weights, mask, num_items)
        return loss, {
            "ref_nll": (-(ref_logps * mask).sum(), mask.sum()),
            "weight_max": (_masked_max(weights, mask), torch.tensor(1.0)),
        }

    def _loss_rho1(self, logps, mask, signals, num_items):
        ref_logps = signals["ref_logps"]  # (B, T-1)
        with torch.no_grad():
            excess = -logps.detach() + ref_logps  # L_theta - L_ref, (B, T-1)
            selected = self._rho1_selection(excess, mask)
        loss = rho1_loss(logps, selected, num_items)
        return loss, {
            "ref_nll": (-(ref_logps * mask).sum(), mask.sum()),
            "selected_frac": (selected.sum(), mask.sum()),
            "excess_mean": ((excess * mask).sum(), mask.sum()),
        }

    def _rho1_selection(self, excess, mask):
        ratio = self.args.rho1_ratio
        if self.args.rho1_scope == "micro_batch" or self.accelerator.num_processes == 1:
            return rho1_select(excess, mask, rho1_num_selected(ratio, int(mask.sum())))
        # global: rank the union of all processes' micro-batches (rank-major), keep this process's rows
        acc = self.accelerator
        width = excess.shape[1]
        all_excess = acc.gather(acc.pad_across_processes(excess, dim=1, pad_index=0.0))  # (P*B, T_max)
        all_mask = acc.gather(acc.pad_across_processes(mask, dim=1, pad_index=False))
        chosen = rho1_select(all_excess, all_mask, rho1_num_selected(ratio, int(all_mask.sum())))
        b = excess.shape[0]
        return chosen[acc.process_index * b : (acc.process_index + 1) * b, :width]


def _masked_max(values, mask):
    return values.masked_fill(~mask, float("-inf")).max() if mask.any() else torch.tensor(0.0)
