"""The LM-head computation every scoring pass shares: backbone hidden states, then only the scored positions projected
through the head, by the cheaper of two paths chosen per call from the shapes and the device.

- direct: `rows` positions at a time, the full (rows, V) float32 logits, then the pass's arithmetic on them
  (log_softmax -> gather, contrastive_scores, generic labels, D_t). Used where a chunk of >= MIN_DIRECT_ROWS positions
  of full logits fits the head budget.
- fused: `rows` positions x `vocab_tile` columns at a time, folded into online per-position statistics (running max
  and sum of exponentials, running argmax), so the largest logits tensor is (rows, vocab_tile). Used where a
  full-vocabulary chunk would be too few positions to amortise reading the head weight (large V).

Why (measured on a 2-core CPU, issue 15; notes in bench/scoring.py): TRL's fused head scores every position on CPU
in tiles of 4096 x 32768 (512 MiB at fp32): each tile misses every cache and its elementwise passes page-fault fresh
buffers, which made the scoring pass slower than plain `model(ids).logits -> log_softmax -> gather` at V = 8k-32k.
The head budget is therefore cache-sized on CPU (HEAD_BYTES_CPU, half the 32 MiB L3 of these machines): a chunk that
stays in cache costs about half a full-logits pass. On CUDA it is larger (HEAD_BYTES_CUDA): bandwidth, not cache.

Logits are computed in float32 from the model's dtype without rounding the product to bf16 first (CUDA: an fp32-output
matmul; CPU: an upcast of the inputs), the model's logit scale and softcap applied as its own forward does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..models import causal_lm

HEAD_BYTES_CPU = 16 << 20  # float32 logits per chunk (all models together) on CPU: stays in a 32 MiB L3
HEAD_BYTES_CUDA = 256 << 20  # on CUDA
MIN_DIRECT_ROWS = 64  # fewer positions per full-V chunk re-read the (V, H) head weight too often: go fused
FUSED_ROWS = 1024  # positions per fused chunk: the head weight is read once per this many positions
MIN_VOCAB_TILE = 256
PATHS = ("auto", "direct", "fused")
_MM_TO_FP32 = [True]  # whether torch.mm(..., out_dtype=float32) works here (set False on its first failure)


def logit_transform(model) -> tuple[float, float | None]:
    """(scale, softcap) the model's own forward applies to its logits, read from the config as TRL's fused head does:
    `logit_scale` / `output_multiplier` / `lm_head_multiplier` / 1 / `logits_scaling`, then `final_logit_softcapping`.
    Llama, Qwen, Mistral and DeepSeek have neither: (1.0, None)."""
    config = causal_lm(model).config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(config, "final_logit_softcapping", None)


def logit_width(model) -> int:
    return causal_lm(model).get_output_embeddings().weight.shape[0]


def head_device(model) -> torch.device:
    return causal_lm(model).get_output_embeddings().weight.device


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) last hidden states of the backbone alone: no LM head, so no (B, T, V) logits."""
    lm = causal_lm(model)
    device = next(lm.parameters()).device
    out = lm.base_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    return out.last_hidden_state  # (B, T, H)


def project(model, hidden: torch.Tensor, transform, start: int = 0, end: int | None = None) -> torch.Tensor:
    """(n, H) hidden states -> (n, end - start) float32 logits of vocabulary ids [start, end) through the model's LM
    head, with its logit scale and softcap."""
    head = causal_lm(model).get_output_embeddings()
    weight = head.weight[start:end]  # (v, H) a view
    hidden = hidden.to(weight.device)
    if weight.dtype == torch.float32 and hidden.dtype == torch.float32:
        logits = hidden @ weight.t()
    elif hidden.device.type == "cuda" and weight.dtype in (torch.float16, torch.bfloat16) and _MM_TO_FP32[0]:
        try:  # fp32 accumulate and output (aten::mm.dtype, a CUDA kernel)
            logits = torch.mm(hidden.to(weight.dtype), weight.t(), out_dtype=torch.float32)
        except (NotImplementedError, RuntimeError, TypeError):  # a build or GPU without it: upcast instead, from now on
            _MM_TO_FP32[0] = False
            logits = hidden.float() @ weight.float().t()
    else:
        logits = hidden.float() @ weight.float().t()  # CPU low precision: upcast, never round the product
    if head.bias is not None:
        logits.add_(head.bias[start:end].float())
    scale, softcap = transform
    if scale != 1.0:
        logits.mul_(scale)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits  # (n, v)


@dataclass(frozen=True)
class HeadPlan:
    """How one batch's N positions go through the head: `rows` positions at a time, `vocab_tile` columns at a time
    (= V on the direct path)."""

    path: str
    rows: int
    vocab_tile: int

    def chunks(self, n_positions: int) -> Iterator[slice]:
        for start in range(0, n_positions, self.rows):
            yield slice(start, min(start + self.rows, n_positions))

    def tiles(self, vocab: int) -> Iterator[tuple[int, int]]:
        for start in range(0, vocab, self.vocab_tile):
            yield start, min(start + self.vocab_tile, vocab)


def plan_head(n_positions: int, vocab: int, device, n_models: int = 1, path: str = "auto") -> HeadPlan:
    """The head path and chunk shapes for N positions of V logits from `n_models` models on `device`.

    rows = budget / (4 bytes x V x n_models): direct when that is >= MIN_DIRECT_ROWS (or covers all N), fused
    otherwise with FUSED_ROWS positions and vocab tiles of budget / (4 x rows x n_models) columns. E.g. CPU, one model,
    N = 4,600: V = 8k -> direct, 512 rows; 32k -> direct, 128 rows; 128k -> fused, 1,024 x 4,096. `path` forces one.
    """
    if path not in PATHS:
        raise ValueError(f"head path must be one of {list(PATHS)}, got {path!r}")
    budget = HEAD_BYTES_CUDA if torch.device(device).type == "cuda" else HEAD_BYTES_CPU
    n = max(n_positions, 1)
    rows = max(1, budget // (4 * vocab * n_models))
    if path == "direct" or (path == "auto" and rows >= min(MIN_DIRECT_ROWS, n)):
        return HeadPlan("direct", min(rows, n), vocab)
    rows = min(FUSED_ROWS, n)
    tile = max(MIN_VOCAB_TILE, budget // (4 * rows * n_models))
    return HeadPlan("fused", rows, min(tile, vocab))


class OnlineLogSumExp:
    """Running log Σ_v exp(z_v) of n rows over vocabulary tiles, and the logit of one target id per row."""

    def __init__(self, n: int, device, targets: torch.Tensor | None = None):
        self.max = torch.full((n,), float("-inf"), device=device)  # (n,)
        self.sum = torch.zeros(n, device=device)  # (n,) Σ exp(z - max)
        self.targets = targets
        self.target = torch.zeros(n, device=device) if targets is not None else None  # (n,)

    def add(self, z: torch.Tensor, start: int) -> None:
        """Fold the tile z (n, v) of vocabulary ids [start, start + v); z is overwritten."""
        if self.targets is not None:
            local = self.targets - start
            inside = (local >= 0) & (local < z.shape[1])
            picked = z.gather(1, local.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)  # (n,)
            self.target = torch.where(inside, picked, self.target)
        new_max = torch.maximum(self.max, z.amax(dim=1))  # (n,)
        self.sum.mul_(torch.exp(self.max - new_max)).add_(z.sub_(new_max.unsqueeze(1)).exp_().sum(dim=1))
        self.max = new_max

    def value(self) -> torch.Tensor:
        return self.max + torch.log(self.sum)  # (n,)


def target_logps(model, hidden: torch.Tensor, targets: torch.Tensor, plan: HeadPlan, transform=None) -> torch.Tensor:
    """log softmax(z_n)[targets_n] of each of N hidden rows (N, H) through the model's head, float32 (N,)."""
    transform = transform or logit_transform(model)
    vocab = logit_width(model)
    device = head_device(model)
    out = torch.zeros(hidden.shape[0])  # (N,) on CPU
    for sl in plan.chunks(hidden.shape[0]):
        h, y = hidden[sl].to(device), targets[sl].to(device)  # (n, H), (n,)
        if plan.path == "direct":
            z = project(model, h, transform)  # (n, V) float32
            out[sl] = torch.log_softmax(z, dim=-1).gather(1, y.unsqueeze(1)).squeeze(1).cpu()
            continue
        lse = OnlineLogSumExp(h.shape[0], device, y)
        for start, end in plan.tiles(vocab):
            lse.add(project(model, h, transform, start, end), start)  # (n, v) tile
        out[sl] = (lse.target - lse.value()).cpu()
    return out
