"""Pure tensor helpers shared by the losses, the trainers and the scoring passes (torch only).

The fused LM head returns per-token log-probs in the "shifted" frame: position p of `logps (B, T-1)` is the log-prob
of `labels[:, p + 1]` given the tokens up to p. Every helper here works in that frame.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """Valid targets in the fused head's frame: labels[:, 1:] != -100.  (B, T) -> (B, T-1) bool."""
    return labels[:, 1:] != IGNORE_INDEX


def segment_ids(position_ids: torch.Tensor | None, shape: torch.Size, device) -> torch.Tensor:
    """Sequence index of every position: 0 for padded rows, a new id at each `position_ids` reset (padding-free)."""
    if position_ids is None:
        return torch.zeros(shape, dtype=torch.long, device=device)  # (B, T)
    return (position_ids == 0).long().cumsum(dim=-1)  # (B, T)


def naive_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference implementation with full `[B, T, V]` logits, for tests and benchmarks only.  -> (B, T-1)."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    targets = labels[:, 1:]
    gathered = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return gathered.masked_fill(targets == IGNORE_INDEX, 0.0)


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, W) long, of token-id rows left-padded to the longest (for generation):
    e.g. [[5, 6], [7]] with pad 0 -> [[5, 6], [0, 7]], [[1, 1], [0, 1]]."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            input_ids[b, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, width - len(row) :] = 1
    return input_ids, attention_mask
