"""Scoring pass: per-token log-probs of a frozen reference model, stored as `ref_logps` beside `completion_ids`.

r_j = log P_ref(c_j | view, c_<j) for every completion token c_j, computed once: the backbone, then only the completion
positions through the LM head by the path `signals.head.plan_head` picks per batch from N, V and the device (never
`[B, T, V]` logits), in batches sorted by length (longest first, so no batch pads much), sharded over processes with
accelerate and returned in input order.

The reference's view (`drop_prompt`):
- false: the policy's own input_ids (prompt + completion): Rho-1's reference model reads what the policy reads.
- true: [s] + completion_ids with s = BOS (EOS when there is none): PRIOR's text-only reference. The ids are cut from
  the policy's tokenisation of prompt+completion, never re-tokenised alone, so they align by construction.
"""

from __future__ import annotations

import logging

import torch

from ..data import completion_ids_of, row_kind, tokenize_row
from ..runtime import progress
from ..tokens import IGNORE_INDEX
from .head import hidden_states, logit_transform, logit_width, plan_head, target_logps

logger = logging.getLogger(__name__)


def reference_view(example, tokenizer, drop_prompt: bool, row: int, chat_template=None) -> dict[str, list[int]]:
    """The row as the policy tokenises it, or (drop_prompt) [s] + its completion ids; `completion_ids` added."""
    out = tokenize_row(example, tokenizer, chat_template)
    completion = completion_ids_of(out["input_ids"], out["labels"])
    if drop_prompt:
        kind = row_kind(example)
        if kind != "prompt_completion" or isinstance(example["completion"], list) and len(example["completion"]) > 1:
            raise ValueError(
                f"row {row}: drop_prompt needs single-completion prompt/completion rows; this row is {kind!r} "
                "(multi-turn and text-only rows have no prompt to drop)"
            )
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        out = {"input_ids": [start, *completion], "labels": [IGNORE_INDEX, *completion]}
    out["completion_ids"] = completion
    return out


@torch.no_grad()
def score_ref_logps(
    dataset,
    reference,
    tokenizer,
    drop_prompt: bool = False,
    batch_size: int = 16,
    accelerator=None,
    chat_template=None,
    head_path: str = "auto",
) -> tuple[list[list[int]], list[list[float]]]:
    """(completion_ids, ref_logps) per row of `dataset`, in input order, on every process. `head_path` forces the
    head computation ("direct" or "fused", `signals.head.plan_head`); "auto" picks it per batch."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    accelerator = accelerator or Accelerator()
    max_positions = getattr(reference.config.get_text_config(), "max_position_embeddings", None)
    views = []
    for i, example in enumerate(dataset):
        view = reference_view(example, tokenizer, drop_prompt, i, chat_template)
        if max_positions is not None and len(view["input_ids"]) > max_positions:
            raise ValueError(
                f"row {i} has {len(view['input_ids'])} tokens but the reference reads at most {max_positions}: "
                "shorten or filter the row (scores are never truncated)"
            )
        if not view["completion_ids"]:
            logger.warning("row %d has an empty completion: nothing to score", i)
        views.append(view)

    # Longest first, then strided over processes so each gets a similar mix of lengths.
    order = sorted(range(len(views)), key=lambda i: -len(views[i]["input_ids"]))
    mine = order[accelerator.process_index :: accelerator.num_processes]
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]

    reference.eval()
    transform, vocab = logit_transform(reference), logit_width(reference)
    device = next(reference.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    for batch in progress(batches, desc="Scoring (ref_logps)", enabled=accelerator.is_main_process):
        width = max(len(views[i]["input_ids"]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, i in enumerate(batch):
            n = len(views[i]["input_ids"])
            input_ids[b, :n] = torch.tensor(views[i]["input_ids"])
            labels[b, :n] = torch.tensor(views[i]["labels"])
            attention_mask[b, :n] = 1
        valid = labels[:, 1:] != IGNORE_INDEX  # (B, T-1) positions whose next token is scored
        hidden = hidden_states(reference, input_ids, attention_mask)[:, :-1]  # (B, T-1, H)
        h = hidden[valid.to(hidden.device)]  # (N, H) only the scored positions reach the head
        plan = plan_head(h.shape[0], vocab, device, path=head_path)
        logps = target_logps(reference, h, labels[:, 1:][valid], plan, transform)  # (N,) float32
        for i, row in zip(batch, logps.split(valid.sum(dim=1).tolist())):
            results.append((i, row.tolist()))

    gathered = gather_object(results) if accelerator.num_processes > 1 else results
    by_row = dict(gathered)
    ref_logps = [by_row[i] for i in range(len(views))]
    return [v["completion_ids"] for v in views], ref_logps


def policy_prompt_ids(dataset, tokenizer, chat_template=None) -> list[list[int]]:
    """Per row, the policy's tokens that are not targets (its prompt): stored as `prompt_ids` beside `completion_ids`
    so that the trainer also checks the context the reference scored (a BOS-adding tokenizer, an edited prompt or a
    changed user turn is then an alignment error, not silent training)."""
    from ..data import context_ids_of

    return [context_ids_of(**tokenize_row(row, tokenizer, chat_template)) for row in dataset]
