"""`keyword_length`: the AlignDistil mini experiment's task, with a computable ground-truth reward (spec aligndistil
section 7).

    prompt    "about tiger with red calm :"          (the tokenizer prepends <bos>)
    response  " the tiger big <eos>"                  (TRL appends <eos> to completions and preference sides)
    reward    r(x, y) = 1[K ∈ y] − 0.1·|n − 4|        K the prompt's keyword, n the words before <eos>

The vocabulary is word-level (`tokenizers` WordLevel, built in code): `<pad> <bos> <eos> about with :`, 16 keywords and
46 fillers, 68 ids in all. The behaviour policy writes n ~ U{1..10} uniform fillers and, with probability 0.5, puts K
in place of one of them; preference pairs are two behaviour samples labelled by Bradley-Terry with temperature 0.25
(noisy labels keep DPO's implicit reward finite). Held-out prompts use (K, W1, W2) triples that occur in no training
row. The model is a 2-layer Llama (hidden 64, 4 heads, MLP 128, untied embeddings, 32 positions): 90,944 parameters.

`RewardCurve` samples held-out prompts during training (the convergence curve of section 7); `alpha_by_kind` splits
a scored α_t column by what the position predicts (the keyword, <eos>, another word).
"""

from __future__ import annotations

import logging
import math
import random
import statistics
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

SPECIALS = ("<pad>", "<bos>", "<eos>")
PROMPT_WORDS = ("about", "with", ":")
KEYWORDS = (
    "apple river stone cloud tiger piano lemon candle rocket garden violin pepper castle meadow falcon ocean"
).split()
FILLERS = (
    "the a one some blue red small big old new green dark soft loud quick slow happy sad bright cold warm tall short "
    "near far high low deep wide thin long round flat sweet sour calm wild rich poor fresh dry wet clean brave shy kind"
).split()
VOCAB = (*SPECIALS, *PROMPT_WORDS, *KEYWORDS, *FILLERS)  # 68 words; id = position
TARGET_LENGTH = 4  # the length the reward prefers
LENGTH_PENALTY = 0.1  # reward lost per word away from TARGET_LENGTH
MAX_WORDS = 10  # behaviour lengths are uniform on 1..MAX_WORDS
BT_TEMPERATURE = 0.25  # P(a ≻ b) = σ((r_a − r_b) / BT_TEMPERATURE)
MAX_NEW_TOKENS = 14  # evaluation and curve sampling budget (spec section 7)


# ------------------------------------------------------------------------------------------------ the reward


def prompt_text(keyword: str, w1: str, w2: str) -> str:
    return f"about {keyword} with {w1} {w2} :"


def reward(words: list[str], keyword: str) -> float:
    """r(x, y) = 1[K ∈ y] − 0.1·|n − 4| over the words before <eos> (all of them when there is none)."""
    return float(keyword in words) - LENGTH_PENALTY * abs(len(words) - TARGET_LENGTH)


def response_words(ids: list[int], tokenizer) -> list[str]:
    """The words of a sampled response up to (not including) its first <eos>."""
    eos = tokenizer.eos_token_id
    ids = ids[: ids.index(eos)] if eos in ids else ids
    return tokenizer.convert_ids_to_tokens(ids)


def score_samples(samples: list[list[int]], keywords: list[str], tokenizer) -> dict[str, list]:
    """Per sample: true reward, whether it holds the keyword, its length in words, whether it ended with <eos>."""
    out = {"reward": [], "keyword": [], "length": [], "ended": []}
    for ids, keyword in zip(samples, keywords):
        words = response_words(ids, tokenizer)
        out["reward"].append(reward(words, keyword))
        out["keyword"].append(keyword in words)
        out["length"].append(len(words))
        out["ended"].append(tokenizer.eos_token_id in ids)
    return out


def win_rate(rewards: list[float], baseline: list[float]) -> float:
    """Fraction of prompts where the model's sample beats the baseline's (one sample each); a tie counts 0.5."""
    if len(rewards) != len(baseline) or not rewards:
        raise ValueError(
            f"win rate needs one sample per prompt from both models, got {len(rewards)} and {len(baseline)}"
        )
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, baseline)) / len(rewards)


# -------------------------------------------------------------------------------------------------- the data


def behaviour_sample(rng: random.Random, keyword: str) -> list[str]:
    """n ~ U{1..10} uniform fillers; with probability 0.5 one random word is replaced by the keyword."""
    words = [rng.choice(FILLERS) for _ in range(rng.randint(1, MAX_WORDS))]
    if rng.random() < 0.5:
        words[rng.randrange(len(words))] = keyword
    return words


def make_data(seed: int, sft_rows: int = 8000, pref_rows: int = 2000, heldout_rows: int = 512) -> dict[str, list]:
    """The three row sets of one seed: `sft` (prompt, completion, keyword), `prefs` and `heldout` (prompt, chosen,
    rejected, keyword). Held-out (K, W1, W2) triples occur in no sft or prefs row; a held-out row carries a
    preference pair too (the scoring pass reads its chosen response)."""
    rng = random.Random(seed)
    triples = [(k, a, b) for k in KEYWORDS for a in FILLERS for b in FILLERS]
    if heldout_rows >= len(triples):
        raise ValueError(f"heldout_rows must be below the {len(triples)} prompt triples, got {heldout_rows}")
    held_order = rng.sample(triples, heldout_rows)  # a list: set order varies with PYTHONHASHSEED
    held = set(held_order)
    train_triples = [t for t in triples if t not in held]

    def pair(triple):
        keyword = triple[0]
        a, b = behaviour_sample(rng, keyword), behaviour_sample(rng, keyword)
        p_a = 1.0 / (1.0 + math.exp(-(reward(a, keyword) - reward(b, keyword)) / BT_TEMPERATURE))
        chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
        return {"prompt": prompt_text(*triple), "chosen": " " + " ".join(chosen), "rejected": " " + " ".join(rejected)}

    sft = []
    for _ in range(sft_rows):
        triple = rng.choice(train_triples)
        sft.append({"prompt": prompt_text(*triple), "completion": " " + " ".join(behaviour_sample(rng, triple[0]))})
        sft[-1]["keyword"] = triple[0]
    prefs = [{**pair(t), "keyword": t[0]} for t in (rng.choice(train_triples) for _ in range(pref_rows))]
    heldout = [{**pair(t), "keyword": t[0]} for t in held_order]
    return {"sft": sft, "prefs": prefs, "heldout": heldout}


def data_summary(data: dict[str, list]) -> dict:
    """Row counts, and the behaviour data's mean reward (SFT completions, chosen and rejected sides)."""

    def mean_reward(rows, column):
        return statistics.mean(reward(r[column].split(), r["keyword"]) for r in rows)

    return {
        "rows": {k: len(v) for k, v in data.items()},
        "sft_completion_reward": mean_reward(data["sft"], "completion"),
        "prefs_chosen_reward": mean_reward(data["prefs"], "chosen"),
        "prefs_rejected_reward": mean_reward(data["prefs"], "rejected"),
    }


# ------------------------------------------------------------------------------------- tokenizer and model


def make_tokenizer():
    """The 68-word WordLevel tokenizer: words split on whitespace (so "small<eos>" is "small", "<eos>": the special
    tokens are matched first), <bos> prepended to every encoded text, decoding joins words with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.add_special_tokens(list(SPECIALS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def make_model(tokenizer, seed: int):
    """The spec's Llama: 2 layers, hidden 64, 4 heads, MLP 128, untied embeddings, 32 positions (90,944 params)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# ------------------------------------------------------------------------------------------ α by position kind


def alpha_by_kind(completion_ids: list[list[int]], alphas: list[list[float]], keywords: list[str], tokenizer) -> dict:
    """Mean α_t at the positions that predict the row's keyword, <eos>, or another word (spec section 7, stage 05),
    with the position counts. Entry t of `alphas` belongs to the distribution predicting `completion_ids[t]`."""
    eos = tokenizer.eos_token_id
    sums = {"keyword": [0.0, 0], "eos": [0.0, 0], "other": [0.0, 0]}
    for ids, values, keyword in zip(completion_ids, alphas, keywords):
        if len(ids) != len(values):
            raise ValueError(f"{len(ids)} completion ids but {len(values)} α values in one row")
        kw = tokenizer.convert_tokens_to_ids(keyword)
        for token, a in zip(ids, values):
            kind = "keyword" if token == kw else "eos" if token == eos else "other"
            sums[kind][0] += a
            sums[kind][1] += 1
    return {k: {"alpha_mean": s / n if n else None, "positions": n} for k, (s, n) in sums.items()}


# --------------------------------------------------------------------------------------- the reward curve


def sample_and_score(model, tokenizer, rows, seed: int, batch_size: int = 512) -> dict:
    """One sample per row's prompt (T 1, top_k 0, 14 new tokens), scored: per-sample lists (`score_samples`) and the
    generated ids (`samples`)."""
    from ..data import prompt_ids
    from ..models import sample

    prompts = [prompt_ids(r, tokenizer) for r in rows]
    samples = sample(model, tokenizer, prompts, MAX_NEW_TOKENS, batch_size=batch_size, seed=seed)
    return {"samples": samples, **score_samples(samples, [r["keyword"] for r in rows], tokenizer)}


class RewardCurve(TrainerCallback):
    """Held-out mean true reward during training: before the first step and every `every` optimizer steps, one sample
    per row of `dataset` (prompt, keyword) from the model being trained, with its own seeded generator (the training
    run's random state is left untouched). Each check is a `log_history` entry {step, curve/reward,
    curve/keyword_rate, curve/length}: it is saved with every checkpoint, so a resumed run keeps its earlier checks,
    and it reaches train_summary.json with the rest of the log."""

    def __init__(self, dataset: str | Path, tokenizer, every: int, seed: int):
        from ..data import load_rows, require_columns

        if every < 1:
            raise ValueError(f"reward_curve_every must be >= 1, got {every}")
        rows = load_rows(dataset)
        require_columns(rows, ["prompt", "keyword"], hint="the reward curve samples keyword_length prompts")
        self.rows, self.tokenizer, self.every, self.seed = list(rows), tokenizer, every, seed

    def _check(self, model, state) -> None:
        step = state.global_step
        scored = sample_and_score(model, self.tokenizer, self.rows, seed=self.seed + step)
        entry = {
            "curve/reward": statistics.mean(scored["reward"]),
            "curve/keyword_rate": statistics.mean(scored["keyword"]),
            "curve/length": statistics.mean(scored["length"]),
            "step": step,
        }
        state.log_history.append(entry)
        logger.info("step %d: held-out mean true reward %.4f", step, entry["curve/reward"])

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # a resumed run has its earlier checks in the restored log history
            self._check(model, state)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._check(model, state)
        return control


def reward_curve(log_history: list[dict]) -> list[dict]:
    """The checks `RewardCurve` logged, as [{step, reward, keyword_rate, length}] in step order."""
    checks = [e for e in log_history if "curve/reward" in e]
    return [
        {"step": e["step"], **{k: e[f"curve/{k}"] for k in ("reward", "keyword_rate", "length")}}
        for e in sorted(checks, key=lambda e: e["step"])
    ]
