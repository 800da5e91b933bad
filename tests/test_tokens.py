"""tokens.left_padded: the one builder of left-padded generation batches (models.generate, the self-distillation and
concept-heads evaluation passes)."""

import torch

from tokentrain.tokens import left_padded


def test_left_padded_rows_and_mask():
    ids, mask = left_padded([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
