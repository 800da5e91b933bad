"""Shared fixtures: a tiny byte-level BPE tokenizer, tiny Llama models, a dozen prompt/completion rows, and a saved
tiny model folder for CLI-level tests. Everything is built in code (no download) and is session-scoped where it is
immutable, so the whole suite pays for it once."""

from __future__ import annotations

import random

import pytest
import torch

from tokentrain.models import tiny_llama, train_tokenizer

_NAMES = ["Aromi", "The Eagle", "Zizzi", "Cotto", "Giraffe", "Loch Fyne", "The Mill", "Wildwood"]
_FOODS = ["Italian", "French", "English", "Chinese", "Indian", "Japanese", "Fast food"]
_AREAS = ["riverside", "city centre"]
_TAILS = [
    "It is family friendly.",
    "It is not family friendly.",
    "Prices are high and the rating is low.",
    "It has a 5 out of 5 customer rating, near the river.",
    "",
]


def _synthetic_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, completion) pairs shaped like the E2E rows: `<s>MR<sep>` -> description + `</s>` is added by TRL."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        name, food, area = rng.choice(_NAMES), rng.choice(_FOODS), rng.choice(_AREAS)
        prompt = f"<s>name[{name}], food[{food}], area[{area}]<sep>"
        completion = f"{name} serves {food} food in the {area}. {rng.choice(_TAILS)}".strip()
        pairs.append((prompt, completion))
    return pairs


@pytest.fixture
def one_thread():
    """Run the test with one torch thread (restored after). Tiny models gain nothing from threads, and on a loaded
    2-core machine OpenMP spin-waiting made their forwards ~100x slower (30 ms per 32x64 matmul)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE, vocab 300, `<pad> <s> </s> <sep>` = ids 0-3, with a ChatML-like chat template."""
    pairs = _synthetic_pairs(40, seed=1)
    texts = [p + c for p, c in pairs] + ["user", "assistant", "system"]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_model_factory(tiny_tokenizer):
    """callable(seed=0) -> a fresh 2-layer Llama (hidden 32, 2 heads, 256 positions) on the tiny tokenizer."""

    def make(seed: int = 0):
        return tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=seed)

    return make


@pytest.fixture(scope="session")
def pc_rows():
    """12 prompt/completion rows of varied lengths; prompts start with `<s>` and end with `<sep>`."""
    rows = [{"prompt": p, "completion": c} for p, c in _synthetic_pairs(11, seed=2)]
    rows.append({"prompt": "<s>name[Aromi]<sep>", "completion": "Aromi."})  # a short one
    return rows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer, tiny_model_factory):
    """A folder holding the tiny model and tokenizer (save_pretrained), loadable like a hub model. Read-only use."""
    out = tmp_path_factory.mktemp("tiny_model")
    tiny_model_factory(0).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out
