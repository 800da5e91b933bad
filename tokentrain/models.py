"""Load policy and auxiliary models and tokenizers; build the tiny models that tests and the quickstart train.

Real runs name a hub model or a local folder (`model: Qwen/Qwen2.5-1.5B`, optionally with a LoRA adapter). Tests and
the quickstart have no download: they train a byte-level BPE tokenizer in code (`tokenizers`) and build a small
Llama-style model from a config, saved to a folder so that every later stage loads it exactly like a hub model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


def load_tokenizer(name_or_path: str | Path):
    """The tokenizer of a hub model or folder; a pad token is set to EOS when the tokenizer has none."""
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | Path,
    dtype: str = "auto",
    adapter: str | Path | None = None,
    merge_adapter: bool = False,
    trainable: bool = True,
):
    """A causal LM by hub name or path; `adapter` loads a PEFT adapter on top (merged if `merge_adapter`).

    Frozen auxiliary models (`trainable=False`) are put in eval mode with gradients off.
    """
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=torch_dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable and not merge_adapter)
        if merge_adapter:
            model = model.merge_and_unload()
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


def vocab_size(model) -> int:
    """Rows of the input embedding: the number of token ids the model can read."""
    return model.get_input_embeddings().weight.shape[0]


def check_same_vocab(tokenizer, model, what: str) -> None:
    """An auxiliary model must read the policy tokenizer's ids: equal vocab sizes or an error giving both."""
    n_model, n_tok = vocab_size(model), len(tokenizer)
    if n_model != n_tok:
        raise ValueError(
            f"{what} has {n_model} embedding rows but the policy tokenizer has {n_tok} tokens: "
            "its ids would not mean the same tokens. Use a model of the same tokenizer family."
        )


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
    desc: str = "Generating",
) -> list[str]:
    """Completions of tokenised prompts (left-padded batches, longest first), decoded without special tokens.

    Greedy by default; generation stops at EOS. Returned in the order of `prompts`.
    """
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: dict[int, str] = {}
    for start in tqdm(range(0, len(order), batch_size), desc=desc):
        batch = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, i in enumerate(batch):
            n = len(prompts[i])
            input_ids[b, width - n :] = torch.tensor(prompts[i])
            attention_mask[b, width - n :] = 1
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
        )
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        for b, i in enumerate(batch):
            texts[i] = tokenizer.decode(out[b, width:], skip_special_tokens=True)
    return [texts[i] for i in range(len(prompts))]
