"""Auxiliary multi-token prediction heads: head i reads the trunk at position t and predicts token t + 1 + i.

Spec: `specs/concept_heads.md` section 3 (heads, persistence). CAFT (arXiv 2506.07833) is one configuration of these
heads; the layouts come from Gloeckle et al. (arXiv 2404.19737, `decoder_layer`) and Medusa (arXiv 2401.10774,
`resblock`). Every head shares the model's frozen final norm and unembedding:

    decoder_layer:  logits_i = lm_head(norm(head_i(h_{N-1}, **kwargs of layer N)))   head_i = a copy of layer N
    resblock:       logits_i = lm_head(norm(h_N + SiLU(W_i h_N + b_i)))              W_i = 0, b_i = 0 at init

so at initialisation every head computes exactly the model's next-token logits. h_{N-1} is the input of the last
decoder layer and h_N its output (before the final norm). A capture hook on the last layer records both and *every
keyword argument the base passed to it* (the attention-mask object, positions, rotary embeddings, flash-attention
varlen arguments), so a decoder-layer head attends exactly as layer N does: causal under eager, sdpa and flash
attention, blind to left padding and to the other documents of a packed row. The official code calls its heads
without a mask and with positions arange(T); it copies `layers[-2]` onto h_{N-1} (an off-by-one) and uses no norm.

The hook records only while armed (`arm()`, by the trainer just before its forward) and disarms when read, so a
recomputation under activation checkpointing, evaluation or `generate()` never touches it.

Memory: `head_nll` (training) and `score` (evaluation: per-head CE and top-1 accuracy on reference answers) project
only the valid rows of one head at a time through TRL 1.16's chunked log-prob kernel
(`trl.kernels.ChunkedLogProbFunction`): no (B, T, V) tensor exists for any head, and the largest loss tensor is one
(min(N_i, 4096), min(V, 32768)) tile whatever the number of heads or the sequence length. `logits` returns the full
(H + 1, B, T, V) logits, for tests and small evaluations only.

Files (`save` / `load`): `heads.safetensors` (keys `heads.<i>.<parameter path>`, i = 0..H-1 for heads 1..H) and
`concept_heads.json` (the head config, the base model's shape and a probe of 16 unembedding entries). Loading is
strict: every key, no extra key, equal shapes, equal model fields and a matching probe, or an error naming them.
"""

from __future__ import annotations

import copy
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .losses.concept_heads import IGNORE_INDEX, head_targets
from .models import causal_lm
from .signals.head import logit_transform

logger = logging.getLogger(__name__)

HEAD_TYPES = ("decoder_layer", "resblock")
ATTACH = {"decoder_layer": "last_layer_input", "resblock": "last_layer_output"}
FORMAT = "tokentrain.concept_heads"
VERSION = 1
WEIGHTS_FILE = "heads.safetensors"
CONFIG_FILE = "concept_heads.json"
PROBE_POINTS = 16
PROBE_RTOL = 1e-2  # bf16-safe: a bf16 copy of a float32 weight is within 2^-8 relative
# Fields of concept_heads.json that must equal the model's (spec section 9 names each with both values).
MODEL_FIELDS = ("hidden_size", "vocab_size", "num_hidden_layers", "layer_class")
_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


@dataclass
class AuxHeadsConfig:
    """Shape of the auxiliary heads: how many, and which layout."""

    num_aux_heads: int = 4
    head_type: str = "decoder_layer"

    def __post_init__(self):
        n = self.num_aux_heads
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"num_aux_heads must be an integer >= 1, got {n!r}")
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {list(HEAD_TYPES)}, got {self.head_type!r}")


@dataclass
class Capture:
    """What the last decoder layer saw in one armed forward."""

    hidden_in: torch.Tensor  # h_{N-1}, the last layer's input.  (B, T, d)
    hidden_out: torch.Tensor  # h_N, its output before the final norm.  (B, T, d)
    kwargs: dict[str, Any]  # every keyword argument of the call; cache None, use_cache False


class ResBlock(nn.Module):
    """Medusa's residual block x + SiLU(W x + b), W and b zero-initialised so that it starts as the identity."""

    def __init__(self, hidden_size: int, dtype=None, device=None):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, dtype=dtype, device=device)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


# ---------------------------------------------------------------------------------------------- model anatomy


def decoder_layers(model) -> nn.ModuleList:
    """The decoder's `layers` list; a model without one is an error naming its class."""
    lm = causal_lm(model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        where = type(decoder).__name__ if decoder is not None else type(lm).__name__
        raise ValueError(
            f"{type(lm).__name__}: its decoder ({where}) has no `layers` list, so auxiliary heads cannot copy or hook "
            "its last decoder layer; concept_heads supports decoder-only models whose `get_decoder().layers` is a "
            "ModuleList (Llama, Qwen, Mistral, Gemma, ...)"
        )
    return layers


def final_norm(model) -> nn.Module:
    """The decoder's final norm (`norm`, `final_layernorm`, `ln_f`, ...), shared by every head."""
    lm = causal_lm(model)
    decoder = lm.get_decoder()
    for name in _NORM_NAMES:
        module = getattr(decoder, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(
        f"{type(decoder).__name__} has no final norm among {list(_NORM_NAMES)}: the heads apply the base's final norm "
        "before its unembedding"
    )


def _shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions keep the full shape in ds_shape


def _gathered(params, modifier: bool = False):
    """Gather ZeRO-3 partitioned parameters for a direct read (or a write, with `modifier`); a no-op otherwise."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0 if modifier else None)


def describe(model) -> dict[str, Any]:
    """The base-model fields saved with the heads and compared when they are loaded."""
    lm = causal_lm(model)
    layers = decoder_layers(lm)
    vocab, hidden = _shape(lm.get_output_embeddings().weight)
    return {
        "model_type": getattr(lm.config, "model_type", None),
        "layer_class": type(layers[-1]).__name__,
        "hidden_size": hidden,
        "vocab_size": vocab,
        "num_hidden_layers": len(layers),
        "name_or_path": getattr(lm.config, "_name_or_path", "") or "",
    }


def unembedding_probe(model) -> list[float]:
    """float32 values of lm_head.weight at 16 fixed entries (k V // 16, k d // 16), k = 0..15."""
    weight = causal_lm(model).get_output_embeddings().weight
    with _gathered([weight]):
        vocab, hidden = weight.shape
        rows = torch.tensor([k * vocab // PROBE_POINTS for k in range(PROBE_POINTS)], device=weight.device)
        cols = torch.tensor([k * hidden // PROBE_POINTS for k in range(PROBE_POINTS)], device=weight.device)
        return weight.detach()[rows, cols].float().cpu().tolist()


def _copy_layer(layer: nn.Module) -> nn.Module:
    """A fresh copy of a decoder layer: same class and weights, no hooks, new parameter objects (under ZeRO-3 the
    gathered weights are copied, and the engine partitions the copy when it is prepared)."""
    with _gathered(layer.parameters()):
        head = copy.deepcopy(layer)
        for module in head.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    module._parameters[name] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
    for module in head.modules():
        for hooks in (
            module._forward_hooks,
            module._forward_pre_hooks,
            module._backward_hooks,
            module._backward_pre_hooks,
        ):
            hooks.clear()
        if "_hf_hook" in module.__dict__:  # accelerate's device-map hook, copied with the layer
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(module)
    return head


def chunked_target_logps(model, rows: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and whether it is the top-1 token, for final-normed hidden rows through the model's frozen
    lm_head, with TRL's chunked kernel: tiles of (min(N, 4096), min(V, 32768)), never (N, V) logits. The model's
    logit scale and softcap apply as in its own forward; lm_head.weight is read inside `maybe_gather_lm_head_ctx`
    (ZeRO-3: gathered for the read) and an FSDP2 DTensor is gathered once, as TRL's fused head does.

    Args:
        rows: (N, d), with or without gradient.  targets: (N,) token ids.

    Returns:
        (logps (N,) float32 with gradient w.r.t. rows, is_top1 (N,) bool)
    """
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, maybe_gather_lm_head_ctx

    lm = causal_lm(model)
    lm_head = lm.get_output_embeddings()
    scale, softcap = logit_transform(lm)
    weight, bias = lm_head.weight, lm_head.bias
    if type(weight).__name__ == "DTensor":
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    with maybe_gather_lm_head_ctx(weight, bias):
        logps, _, _, _, top1 = ChunkedLogProbFunction.apply(
            rows.to(weight.device),
            weight,
            bias,
            targets.to(weight.device),
            1.0,
            min(_shape(weight)[0], _CHUNKED_LOGPROB_CHUNK_SIZE),  # the tile is never wider than V
            softcap,
            scale,
            ("is_top1",),
        )
    return logps, top1


# ------------------------------------------------------------------------------------------------------ the heads


class AuxHeads(nn.Module):
    """H auxiliary heads attached to a causal LM as its submodule `concept_heads`.

    Build with `AuxHeads.attach(model, config)` (fresh heads, each equal to the next-token head) or
    `AuxHeads.load(model, folder)` (strict). Attach before PEFT wrapping and before accelerate/DeepSpeed prepare.
    """

    def __init__(self, config: AuxHeadsConfig, heads: list[nn.Module], model_info: dict, probe: list[float]):
        super().__init__()
        self.config = config
        self.heads = nn.ModuleList(heads)
        self.model_info = model_info  # describe(model) at attach time
        self.probe = probe  # the unembedding the heads read (frozen in every phase)
        self._armed = False
        self._record: dict[str, Any] = {}
        self._handles: list = []

    # ---------------------------------------------------------------------------------------------- building

    @classmethod
    def attach(cls, model, config: AuxHeadsConfig) -> AuxHeads:
        """Add H fresh heads to `model` (as `model.concept_heads`) and the capture hooks to its last layer."""
        if hasattr(model, "peft_config"):
            raise ValueError(
                "attach the concept heads before wrapping the model with PEFT (they take no LoRA); to evaluate a LoRA "
                "fine-tune with heads, merge its adapter first (load_model(..., merge_adapter=True))"
            )
        lm = causal_lm(model)
        if "concept_heads" in lm._modules:
            raise ValueError(f"{type(lm).__name__} already has concept_heads attached")
        layers = decoder_layers(lm)
        final_norm(lm)  # fail early when there is none
        last = layers[-1]
        weight = lm.get_output_embeddings().weight
        hidden = _shape(weight)[1]
        if config.head_type == "decoder_layer":
            modules = [_copy_layer(last) for _ in range(config.num_aux_heads)]
        else:
            modules = [ResBlock(hidden, dtype=weight.dtype, device=weight.device) for _ in range(config.num_aux_heads)]
        heads = cls(config, modules, describe(lm), unembedding_probe(lm))
        lm.concept_heads = heads
        heads._handles = [
            last.register_forward_pre_hook(heads._record_input, with_kwargs=True),
            last.register_forward_hook(heads._record_output),
        ]
        return heads

    def detach(self, model) -> None:
        """Remove the hooks and the `concept_heads` submodule (the model is vanilla again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        lm = causal_lm(model)
        if lm._modules.get("concept_heads") is self:
            del lm._modules["concept_heads"]

    # --------------------------------------------------------------------------------------------- capturing

    def _record_input(self, module, args, kwargs):
        if not self._armed or "hidden_in" in self._record:
            return None
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        for key in _CACHE_KWARGS:
            if key in kwargs:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        self._record["hidden_in"] = hidden
        self._record["kwargs"] = kwargs
        return None

    def _record_output(self, module, args, output):
        if self._armed and "hidden_out" not in self._record:
            self._record["hidden_out"] = output[0] if isinstance(output, (tuple, list)) else output
        return None

    def arm(self) -> None:
        """Record the next forward of the last decoder layer."""
        self._armed = True
        self._record = {}

    def disarm(self) -> None:
        self._armed = False
        self._record = {}

    def read(self) -> Capture:
        """The recorded forward, once; disarms the hook."""
        record, self._record, self._armed = self._record, {}, False
        if "hidden_in" not in record or "hidden_out" not in record:
            raise RuntimeError(
                "the last decoder layer did not run during the armed forward: call arm() right before the model's "
                "forward (a model that skips its last layer cannot feed the heads)"
            )
        return Capture(record["hidden_in"], record["hidden_out"], record["kwargs"])

    # ----------------------------------------------------------------------------------------------- compute

    def head_hidden(self, i: int, capture: Capture) -> torch.Tensor:
        """Head i+1's hidden state before the final norm, at every position.  (B, T, d)"""
        head = self.heads[i]
        if self.config.head_type == "decoder_layer":
            out = head(capture.hidden_in, **capture.kwargs)
            return out[0] if isinstance(out, (tuple, list)) else out
        return head(capture.hidden_out)

    def head_nll(self, model, capture: Capture, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head NLL sums and top-1 hit counts of heads 1..H over one micro-batch, one head after another.

        For head i, the valid rows of norm(head_i(...)) go through TRL's chunked log-prob kernel against the frozen
        lm_head: no (B, T, V) tensor exists. A head without a valid target adds 0 * sum(h) (exactly 0, and its
        parameters stay in the graph, as DDP needs).

        Args:
            targets: `head_targets(...)`, row i + 1 for head i.  (H + 1, B, T)

        Returns:
            (nll_sums (H,) with gradient, correct (H,) int64 without)
        """
        norm = final_norm(model)
        sums, correct = [], []
        for i in range(self.config.num_aux_heads):
            target = targets[i + 1]  # (B, T)
            valid = target != IGNORE_INDEX  # (B, T)
            hidden = self.head_hidden(i, capture)  # (B, T, d)
            if not bool(valid.any()):
                sums.append(hidden.sum() * 0.0)
                correct.append(torch.zeros((), dtype=torch.long, device=hidden.device))
                continue
            logps, top1 = chunked_target_logps(model, norm(hidden[valid]), target[valid])  # (N_i,) each
            sums.append(-logps.sum())
            correct.append(top1.sum())
        return torch.stack(sums), torch.stack(correct)

    @torch.no_grad()
    def score(self, model, input_ids, labels, attention_mask=None, position_ids=None) -> dict[str, torch.Tensor]:
        """Teacher-forced per-head NLL sums, top-1 hits and target counts on reference `labels` (the evaluation's
        per-head CE and accuracy), index 0 the model's own next-token head. Chunked like training: no (B, T, V)
        logits for any head, so it runs at full vocabulary and length.

        Returns {"nll": (H + 1,) float, "correct": (H + 1,) int64, "count": (H + 1,) int64}.
        """
        targets = head_targets(labels, self.config.num_aux_heads, position_ids, attention_mask)
        self.arm()
        try:
            out = causal_lm(model).base_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
            capture = self.read()
        finally:
            self.disarm()
        valid = targets[0] != IGNORE_INDEX
        logps, top1 = chunked_target_logps(model, out.last_hidden_state[valid], targets[0][valid])
        sums, hits = self.head_nll(model, capture, targets)
        return {
            "nll": torch.cat([(-logps.sum()).reshape(1).to(sums.dtype), sums]).float().cpu(),
            "correct": torch.cat([top1.sum().reshape(1), hits]).cpu(),
            "count": (targets != IGNORE_INDEX).sum(dim=(1, 2)).cpu(),
        }

    @torch.no_grad()
    def logits(self, model, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """Full logits of the model and of every head from one forward (evaluation and tests only).

        Returns (H + 1, B, T, V); index 0 is the model's own logits of that forward.
        """
        self.arm()
        try:
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
            capture = self.read()
        finally:
            self.disarm()
        lm = causal_lm(model)
        norm, lm_head = final_norm(lm), lm.get_output_embeddings()
        scale, softcap = logit_transform(lm)
        result = [out.logits]
        for i in range(self.config.num_aux_heads):
            z = lm_head(norm(self.head_hidden(i, capture)))  # (B, T, V)
            if scale != 1.0:
                z = z * scale
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            result.append(z.to(out.logits.dtype))
        return torch.stack(result)

    # ------------------------------------------------------------------------------------------- persistence

    def metadata(self) -> dict[str, Any]:
        dtype = next(self.parameters()).dtype
        return {
            "format": FORMAT,
            "version": VERSION,
            "num_aux_heads": self.config.num_aux_heads,
            "head_type": self.config.head_type,
            "attach": ATTACH[self.config.head_type],
            "final_norm": True,
            **self.model_info,
            "dtype": str(dtype).removeprefix("torch."),
            "unembedding_probe": self.probe,
        }

    def save(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write `heads.safetensors` and `concept_heads.json` to `folder`. `state_dict`: the heads' own state (keys
        `heads.<i>....`) when the caller already gathered it (ZeRO-3, FSDP); else read from the module."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            with _gathered(self.parameters()):
                state_dict = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(
                f"heads state to save has keys {sorted(set(state) ^ expected)[:5]} that differ from the heads'"
            )
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        (folder / CONFIG_FILE).write_text(json.dumps(self.metadata(), indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, model, folder: str | Path, expected: AuxHeadsConfig | None = None) -> AuxHeads:
        """Attach heads saved in `folder` to `model`, strictly: an error names what does not match."""
        folder = Path(folder)
        meta = read_heads_config(folder)
        config = AuxHeadsConfig(num_aux_heads=meta["num_aux_heads"], head_type=meta["head_type"])
        if expected is not None:
            for key in ("num_aux_heads", "head_type"):
                if getattr(expected, key) != getattr(config, key):
                    raise ValueError(
                        f"heads in {folder} were saved with {key} {getattr(config, key)!r} but this run asks for "
                        f"{getattr(expected, key)!r}: set {key}: {getattr(config, key)!r} or retrain the heads"
                    )
        here = describe(model)
        for key in MODEL_FIELDS:
            if meta.get(key) != here[key]:
                raise ValueError(
                    f"heads in {folder} were saved for another model: {key} is {meta.get(key)!r} there but "
                    f"{here[key]!r} here ({here['name_or_path'] or type(causal_lm(model)).__name__}; heads saved for "
                    f"{meta.get('name_or_path')!r})"
                )
        probe = torch.tensor(unembedding_probe(model), dtype=torch.float64)
        saved = torch.tensor(meta["unembedding_probe"], dtype=torch.float64)
        if probe.shape != saved.shape or not torch.allclose(probe, saved, rtol=PROBE_RTOL, atol=1e-8):
            diff = (probe - saved).abs().max().item() if probe.shape == saved.shape else float("nan")
            raise ValueError(
                f"heads in {folder} were trained against another lm_head: the unembedding probe (16 entries of "
                f"lm_head.weight) differs from this model's by up to {diff:.3g} (rtol {PROBE_RTOL}); load the heads "
                f"onto the base they were trained on ({meta.get('name_or_path')!r})"
            )
        heads = cls.attach(model, config)
        try:
            heads.load_weights(folder / WEIGHTS_FILE)
        except Exception:
            heads.detach(model)
            raise
        return heads

    def load_weights(self, path: str | Path) -> None:
        """Strict load of `heads.safetensors`: same keys, same shapes (cast to the heads' dtype)."""
        from safetensors.torch import load_file

        state = load_file(str(path))
        expected = {name: _shape(p) for name, p in self.named_parameters()}
        expected.update({name: tuple(b.shape) for name, b in self.state_dict().items() if name not in expected})
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        misshaped = sorted(
            f"{k}: saved {tuple(state[k].shape)}, expected {expected[k]}"
            for k in set(state) & set(expected)
            if tuple(state[k].shape) != expected[k]
        )
        if missing or unexpected or misshaped:
            parts = []
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
                if keys:
                    more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                    parts.append(f"{what} keys {keys[:5]}{more}")
            raise ValueError(f"{path}: the heads do not load strictly: " + "; ".join(parts))
        with _gathered(self.parameters(), modifier=True):
            own = self.state_dict()
            self.load_state_dict({k: v.to(dtype=own[k].dtype) for k, v in state.items()}, strict=True)


def read_heads_config(folder: str | Path) -> dict[str, Any]:
    """`concept_heads.json` of a heads folder, checked for its format; missing files are an error naming them."""
    folder = Path(folder)
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a concept-heads folder: {', '.join(missing)} missing (a phase `heads` run writes "
            f"<output_dir>/heads/{WEIGHTS_FILE} and {CONFIG_FILE}; the official heads.pth is not loadable)"
        )
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{folder / CONFIG_FILE}: format {meta.get('format')!r} version {meta.get('version')!r}, expected "
            f"{FORMAT!r} version {VERSION}"
        )
    for key in ("num_aux_heads", "head_type", "unembedding_probe", *MODEL_FIELDS):
        if key not in meta:
            raise ValueError(f"{folder / CONFIG_FILE} lacks the field {key!r}")
    return meta


def heads_state_from(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The heads' own entries (`heads.<i>....`) of a full model state dict (any wrapper prefix before
    `concept_heads.`)."""
    marker = "concept_heads."
    return {k.split(marker, 1)[1]: v for k, v in state_dict.items() if marker in k}
