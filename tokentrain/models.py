"""Load policy and auxiliary models and tokenizers; build the tiny models that tests and the quickstart train.

Real runs name a hub model or a local folder (`model: Qwen/Qwen2.5-1.5B`, optionally with a LoRA adapter). Tests and
the quickstart have no download: they train a byte-level BPE tokenizer in code (`tokenizers`) and build a small
Llama-style model from a config, saved to a folder so that every later stage loads it exactly like a hub model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .tokens import left_padded

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<sep>")

# A minimal ChatML-like template for the tiny tokenizer, so `messages` rows work offline exactly as with hub models.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}<sep>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant<sep>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts` (no prefix space), with `<pad> <s> </s> <sep>` as ids 0-3.

    No post-processor: the tokenizer adds no special tokens by itself, so prompts carry `<s>` explicitly and the
    completion's `</s>` is the EOS that TRL appends.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", sep_token="<sep>"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def char_tokenizer(alphabet: str, specials: tuple[str, ...] = ("<pad>", "<bos>", "<eos>")) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet`, after `specials` (ids 0, 1, 2: pad, bos, eos); <bos> is prepended to
    every encoded text, as Llama tokenizers do. The arith_chain mini experiment's tokenizer: the 3 `specials` + the 17
    characters "0123456789+-=:QA\\n" = 20 ids. A character outside the alphabet is an error (no unknown token).
    """
    from tokenizers import Tokenizer, decoders, models, processors

    pad, bos, eos = specials
    vocab = {tok: i for i, tok in enumerate([*specials, *alphabet])}
    if len(vocab) != len(specials) + len(alphabet):
        raise ValueError(f"alphabet {alphabet!r} repeats a character or a special token")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: every character is its own token
    tok.add_special_tokens(list(specials))
    tok.decoder = decoders.Fuse()  # concatenate, no spaces between characters
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos)


def tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 192,
    max_positions: int = 256,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A small LlamaForCausalLM with tied embeddings (the E2E mini experiment's shape by default: 246,336 params)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_tiny(out_dir: str | Path, texts: Iterable[str], vocab_size: int = 512, seed: int = 0, **model_kwargs) -> Path:
    """Train a tokenizer on `texts`, build a tiny Llama, save both to `out_dir` (loadable with `load_model`)."""
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = tiny_llama(tokenizer, seed=seed, **model_kwargs)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("built tiny model: %d parameters, vocab %d -> %s", n_params, len(tokenizer), out_dir)
    return out_dir


def load_tokenizer(name_or_path: str | Path, revision: str = "main", trust_remote_code: bool = False):
    """The tokenizer of a hub model or folder; a pad token is set to EOS when the tokenizer has none."""
    path = Path(str(name_or_path))
    if path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{path} holds no tokenizer (no tokenizer.json or tokenizer_config.json)")
    if not path.exists() and (str(name_or_path).startswith(("/", ".", "~")) or str(name_or_path).count("/") > 1):
        raise FileNotFoundError(f"model folder not found: {name_or_path} (a hub model is named 'org/name')")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(name_or_path), revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as e:  # not a local folder, and the hub did not answer or has no such model
        raise FileNotFoundError(f"could not load the tokenizer of {name_or_path!r}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | Path,
    dtype: str = "auto",
    adapter: str | Path | None = None,
    merge_adapter: bool = False,
    trainable: bool = True,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str = "main",
    in_engine: bool = False,
):
    """A causal LM by hub name or path; `adapter` loads a PEFT adapter on top (merged if `merge_adapter`).

    A folder holding only a PEFT adapter (what a LoRA `sft`/`train` stage writes) loads its base model, named in
    `adapter_config.json`, with the adapter on top. Frozen auxiliary models (`trainable=False`) are put in eval mode
    with gradients off. `dtype`: auto, float32, bfloat16 or float16. A frozen model loads whole even under ZeRO-3
    (`outside_zero3_init`), unless `in_engine`: a trainer's auxiliary model that it wraps in a DeepSpeed engine as TRL
    wraps a reference model (`prepare_deepspeed`), which is then loaded partitioned like the policy.
    """
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {dtype!r}")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    path = Path(str(name_or_path))
    adapter_config = path / "adapter_config.json"
    if adapter is None and adapter_config.exists():
        import json

        adapter, name_or_path = name_or_path, json.loads(adapter_config.read_text())["base_model_name_or_path"]
        logger.info("%s is a PEFT adapter: loading its base %s under it", adapter, name_or_path)
    elif path.is_dir() and not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path} is a folder without config.json: not a model (a dataset folder, or an unfinished output?)"
        )
    elif not path.exists() and (str(name_or_path).startswith(("/", ".", "~")) or str(name_or_path).count("/") > 1):
        raise FileNotFoundError(f"model folder not found: {name_or_path} (a hub model is named 'org/name')")
    kwargs = {"dtype": torch_dtype, "revision": revision, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with contextlib.nullcontext() if trainable or in_engine else outside_zero3_init():
        try:
            model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
        except OSError as e:  # not a local folder, and the hub did not answer or has no such model
            raise FileNotFoundError(f"could not load the model {name_or_path!r}: {e}") from None
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable and not merge_adapter)
        if merge_adapter:
            model = model.merge_and_unload()
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


@contextlib.contextmanager
def outside_zero3_init():
    """Load a frozen model whole, even after a ZeRO-3 training stage in this process: transformers would otherwise
    build it under `deepspeed.zero.Init` (partitioned weights), which only a DeepSpeed engine can run. The scoring,
    generate and evaluate stages use their models outside any engine."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def vocab_size(model) -> int:
    """Rows of the input embedding: the number of token ids the model can read."""
    return model.get_input_embeddings().weight.shape[0]


def check_same_vocab(tokenizer, model, what: str, model_tokenizer=None) -> None:
    """An auxiliary model must read the policy tokenizer's ids.

    Its embedding may be wider than the tokenizer (Qwen2.5 pads 151,665 tokens to 151,936 rows) but never narrower;
    when the model comes with its own tokenizer (`model_tokenizer`), both must map the same strings to the same ids.
    """
    n_model, n_tok = vocab_size(model), len(tokenizer)
    if n_model < n_tok:
        raise ValueError(
            f"{what} has {n_model} embedding rows but the policy tokenizer has {n_tok} tokens: "
            "its ids would not mean the same tokens. Use a model of the same tokenizer family."
        )
    if model_tokenizer is None:
        return
    own, policy = model_tokenizer.get_vocab(), tokenizer.get_vocab()
    if own != policy:
        diff = sorted(set(own.items()) ^ set(policy.items()), key=lambda kv: kv[1])[:3]
        raise ValueError(
            f"{what}'s tokenizer ({len(own)} tokens) differs from the policy tokenizer ({len(policy)} tokens), "
            f"e.g. {diff}: its scores would belong to other token ids. Use fine-tunes of the policy's base model."
        )
    for name in ("bos_token", "eos_token", "unk_token"):
        a, b = getattr(model_tokenizer, name, None), getattr(tokenizer, name, None)
        if a != b:
            raise ValueError(
                f"{what}'s tokenizer has {name} {a!r} where the policy tokenizer has {b!r}: the two read the same ids "
                "differently (e.g. where a sequence starts or ends). Use fine-tunes of the policy's base model."
            )


def has_tokenizer(path: str | Path) -> bool:
    """Whether `path` brings its own tokenizer (a hub name is assumed to)."""
    folder = Path(str(path))
    return not folder.is_dir() or any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))


def _stop_criteria(tokenizer, stop_strings, prompt_width: int):
    """Per-sequence stop once the generated text contains a stop string. Only the last few generated tokens are
    decoded each step (as many as the longest stop string has characters, + 2), so the cost does not grow with the
    length. (transformers' `stop_strings` needs a tokenizer whose vocabulary can spell its probe prefix.)"""
    from transformers import StoppingCriteria, StoppingCriteriaList

    window = max(len(s) for s in stop_strings) + 2

    class StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            tail = input_ids[:, max(prompt_width, input_ids.shape[1] - window) :]
            texts = tokenizer.batch_decode(tail, skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop_strings) for t in texts], device=input_ids.device)

    return StoppingCriteriaList([StopOnStrings()])


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    desc: str = "Generating",
    progress: bool = True,
    stop_strings: tuple[str, ...] = (),
) -> list[str]:
    """Completions of tokenised prompts (left-padded batches, longest first), decoded without special tokens.

    Greedy by default; generation stops at EOS, and a sequence also stops once it has produced one of `stop_strings`
    (few-shot prompts: a base model goes on with the next "\n\nQuestion:" instead of EOS; the stop string is kept in
    the text and cut by the caller). Sampling uses exactly `temperature`, `top_p` and `top_k`
    (0 = off), not the model's generation_config defaults. Returned in the order of `prompts`.
    """
    from .runtime import progress as progress_display

    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: dict[int, str] = {}
    for start in progress_display(range(0, len(order), batch_size), desc=desc, enabled=progress):
        batch = order[start : start + batch_size]
        input_ids, attention_mask = left_padded([prompts[i] for i in batch], pad_id)
        width = input_ids.shape[1]
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
            if do_sample
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            **({"stopping_criteria": _stop_criteria(tokenizer, stop_strings, width)} if stop_strings else {}),
            **sampling,
        )
        for b, i in enumerate(batch):
            texts[i] = tokenizer.decode(out[b, width:], skip_special_tokens=True)
    return [texts[i] for i in range(len(prompts))]


# ------------------------------------------------------------------------------------ auxiliary-model checks
# Checks of frozen auxiliary models against the policy (aligndistil's DPO and reverse/reference models, a scoring
# pass's models): same vocabulary and special tokens, same LM-head width, raw logits, not the same model twice.

# Config attributes that make a model's forward transform its logits (what TRL's fused head reads, and more).
LOGIT_TRANSFORM_KEYS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def causal_lm(model):
    """The transformers model under a PEFT wrapper (its adapters stay active), else the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_name(model, fallback: str) -> str:
    """The path or hub id a model was loaded from, else `fallback` (an in-memory model)."""
    return getattr(causal_lm(model), "name_or_path", "") or fallback


def check_logit_transforms(model, name: str) -> None:
    """Refuse a model whose forward soft-caps or scales its logits: formulas over raw head outputs (a teacher built
    from two models' logits) would silently differ from the model's own distribution."""
    config = causal_lm(model).config.get_text_config()
    found = {}
    if getattr(config, "final_logit_softcapping", None) is not None:
        found["final_logit_softcapping"] = config.final_logit_softcapping
    for key in LOGIT_TRANSFORM_KEYS[1:]:
        value = getattr(config, key, None)
        if value is not None and value != 1:
            found[key] = value
    if found:
        raise ValueError(
            f"{name} declares a logit transform {found}: formulas over several models' logits (aligndistil's teacher) "
            "assume raw logits (no soft-capping, logit scale 1) in v1; use a model family without it"
        )


def head_rows(model) -> int:
    """Rows of the LM head (its logit width), also when ZeRO-3 has partitioned the weight."""
    weight = causal_lm(model).get_output_embeddings().weight
    return int(weight.ds_shape[0]) if hasattr(weight, "ds_shape") else int(weight.shape[0])


def check_head_rows(model, name: str, other, other_name: str) -> None:
    """Two models' LM heads must have the same width: their distributions are compared or mixed token by token."""
    a, b = head_rows(model), head_rows(other)
    if a != b:
        raise ValueError(
            f"LM-head rows differ: {name} has {a} and {other_name} has {b}: their distributions are compared token "
            "by token, so the models must share one vocabulary (AlignDistil's official code truncates; tokentrain "
            "refuses)"
        )


def saved_tokenizer(path: str):
    """The tokenizer saved beside a model (folder or hub id), or None when there is none."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None


def check_same_tokenizer(tokenizer, tokenizer_name: str, other, other_name: str) -> None:
    """Same token -> id mapping and the same EOS/BOS; the error names both models and the first differing token
    (`check_same_vocab` is the looser check of a model against the policy tokenizer)."""
    own, theirs = tokenizer.get_vocab(), other.get_vocab()
    if own != theirs:
        by_id_own = {i: t for t, i in own.items()}
        by_id_theirs = {i: t for t, i in theirs.items()}
        first = min(i for i in set(by_id_own) | set(by_id_theirs) if by_id_own.get(i) != by_id_theirs.get(i))
        raise ValueError(
            f"tokenizer mismatch between {tokenizer_name} ({len(own)} tokens) and {other_name} ({len(theirs)} tokens): "
            f"the first differing id is {first}, {by_id_own.get(first)!r} in {tokenizer_name} but "
            f"{by_id_theirs.get(first)!r} in {other_name}; the models must be fine-tunes of one base"
        )
    for attr in ("eos_token", "bos_token"):
        if getattr(tokenizer, attr) != getattr(other, attr):
            raise ValueError(
                f"special-token mismatch: {attr} is {getattr(tokenizer, attr)!r} in {tokenizer_name} but "
                f"{getattr(other, attr)!r} in {other_name}"
            )


def check_auxiliary_models(tokenizer, models: list[tuple[object, str]]) -> None:
    """Models whose logits are compared position by position on one tokenizer's ids (`models`: (model, name) pairs,
    the first the one the others are checked against, e.g. the student): no logit transform, LM heads of one width,
    no more tokenizer tokens than head rows, and each later model's own saved tokenizer (when it has one) equal to
    `tokenizer`. Every error names the models."""
    first, first_name = models[0]
    for model, name in models:
        check_logit_transforms(model, name)
    for model, name in models[1:]:
        check_head_rows(first, first_name, model, name)
        own = saved_tokenizer(model_name(model, "")) if model_name(model, "") else None
        if own is None:
            logger.info("%s has no saved tokenizer: vocabulary checked by LM-head rows only", name)
        else:
            check_same_tokenizer(tokenizer, first_name, own, name)
    if len(tokenizer) > head_rows(first):
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but {first_name} has {head_rows(first)} LM-head rows: the "
            "tokenizer does not belong to these models"
        )


def same_weights(a, b) -> bool:
    """True when two models are one object or hold identical parameters (names, shapes and values); False also when
    their parameters are ZeRO-3 partitions (not comparable here)."""
    if a is b or causal_lm(a) is causal_lm(b):
        return True
    pa, pb = dict(causal_lm(a).named_parameters()), dict(causal_lm(b).named_parameters())
    if pa.keys() != pb.keys():
        return False
    for k, x in pa.items():
        y = pb[k]
        if hasattr(x, "ds_id") or x.shape != y.shape or not torch.equal(x.detach().cpu(), y.detach().cpu()):
            return False
    return True


def warn_if_same(a, b, names: tuple[str, str], consequence: str) -> bool:
    """Warn when two auxiliary models that should differ are the same path or the same weights; `consequence` says
    what the run then amounts to. Returns whether they are the same."""
    import os
    import warnings

    paths = [model_name(m, "") for m in (a, b)]
    same_path = all(paths) and os.path.realpath(paths[0]) == os.path.realpath(paths[1])
    if not (same_path or same_weights(a, b)):
        return False
    warnings.warn(
        f"{names[0]} and {names[1]} are the same {'path' if same_path else 'weights'}: {consequence}",
        UserWarning,
        stacklevel=3,
    )
    return True


def training_arg(path: str | None, name: str):
    """The value of `name` in the training arguments a Trainer saved beside the model at `path` (training_args.bin),
    or None when there is no such file or it cannot be read (e.g. the `beta` a DPO stage trained with)."""
    if not path or not (Path(path) / "training_args.bin").is_file():
        return None
    try:
        args = torch.load(Path(path) / "training_args.bin", weights_only=False)
    except Exception as e:  # an unreadable file only loses the check
        logger.info("could not read %s/training_args.bin (%s): %s not checked", path, e, name)
        return None
    return getattr(args, name, None)


def sampling_kwargs(
    tokenizer, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0
) -> dict:
    """`generate` keyword arguments for plain sampling with every filter set explicitly: transformers fills each unset
    value from the checkpoint's generation_config.json, then from its global defaults (top_k 50). `max_new_tokens` < 1
    is an error."""
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    return {
        "do_sample": True,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_new_tokens": max_new_tokens,
        "repetition_penalty": 1.0,  # neutral values for the other filters a checkpoint may set
        "typical_p": 1.0,
        "epsilon_cutoff": 0.0,
        "eta_cutoff": 0.0,
        "no_repeat_ngram_size": 0,
        "min_new_tokens": 0,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def cut_after_eos(ids: list[int], eos_token_id: int) -> tuple[list[int], bool]:
    """A sample up to and including its first EOS, and whether it had one (never forced: a cut sample stays cut)."""
    if eos_token_id in ids:
        return ids[: ids.index(eos_token_id) + 1], True
    return ids, False


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 64,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> list[list[int]]:
    """One sampled response per tokenised prompt, as token ids cut after the first EOS (EOS kept), in prompt order.

    Left-padded batches in prompt order; the torch generator is seeded with `seed` inside `torch.random.fork_rng`,
    so the samples depend only on the model, the prompts, `batch_size` and `seed`, and the caller's random state
    (e.g. a training run's) is left as it was. Every sampling setting is explicit (`sampling_kwargs`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    kwargs = sampling_kwargs(tokenizer, max_new_tokens, temperature, top_p, top_k)
    pad_id = kwargs["pad_token_id"]
    out: list[list[int]] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            width = max(len(p) for p in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, p in enumerate(batch):
                input_ids[b, width - len(p) :] = torch.tensor(p)
                attention_mask[b, width - len(p) :] = 1
            ids = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
            out += [cut_after_eos(row[width:].tolist(), tokenizer.eos_token_id)[0] for row in ids]
    model.train(was_training)
    return out
