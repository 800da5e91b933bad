"""`stage: prepare` for unlearning (spec specs/unlearning.md sections 2.2, 7 and 8): forget, retain and evaluation rows.

Tasks:
- `text_blocks`: plain-text forget (and retain) books -> rows {prompt: "", completion: block} of at most
  `block_tokens` tokens of `tokenizer` (section 2.2, `anchors.text_blocks`): `forget.jsonl`, `retain.jsonl` and the
  held-out tail of the retain blocks, `retain_heldout.jsonl` (what `retain_ppl` reads). The real-scale book recipe.
- `tofu`: TOFU question/answer rows (hub `locuslab/TOFU` configs or local json files) -> `forget.jsonl` (prompt,
  completion and the question, answer, paraphrased and perturbed answers the truth ratio reads), `retain.jsonl` and
  `retain_eval.jsonl` (its first `retain_eval_rows` rows). Base models read `Question: {question}\\nAnswer:`, chat
  models (`chat: true`) TRL's conversational prompt-completion rows (`tasks.tofu.qa_row`).
- `unlearning_mini`: the mini experiment of section 7 from ../shared/data: the byte-level BPE (vocab 2,048, one
  special `<|endoftext|>`) trained on Alice + Tiny Shakespeare + the TOFU rows, the 1.12M-parameter Llama in `init/`,
  the Alice and Shakespeare blocks, the checkpoint's training rows and the TOFU splits.
- `unlearning_synthetic`: the quickstart's data made in code: a short "book" of template sentences about five invented
  characters inside generic text of the same shape, its 5-term dictionary (`terms.yaml`), 8 familiarity prompts
  (`prompts.jsonl`), the tokenizer and a tiny Llama.
Every task writes `prepare_summary.json` (row and token counts).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import ConfigError, Stage, StageConfig, StageContext, require, stage_output

logger = logging.getLogger(__name__)

TASKS = ("text_blocks", "tofu", "unlearning_mini", "unlearning_synthetic")
ENDOFTEXT = "<|endoftext|>"
MINI_MODEL = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 384, "max_positions": 512}
MODEL_KEYS = set(MINI_MODEL)


@dataclass
class Config(StageConfig):
    task: str = field(
        default="text_blocks",
        metadata={"help": "text_blocks (books -> blocks), tofu (TOFU rows), unlearning_mini or unlearning_synthetic."},
    )
    tokenizer: str = field(
        default="",
        metadata={"help": "text_blocks: the trainer's tokenizer (hub name or folder): blocks count its tokens."},
    )
    forget_text: str = field(default="", metadata={"help": "text_blocks: the forget book (.txt or .txt.gz)."})
    retain_text: str = field(default="", metadata={"help": "text_blocks: general text for the retain rows (optional)."})
    block_tokens: int = field(
        default=512, metadata={"help": "Tokens per block at most (special tokens not counted; paper 512, mini 128)."}
    )
    heldout_share: float = field(
        default=0.1, metadata={"help": "Share of the retain blocks (the last ones) held out for retain_ppl."}
    )
    forget_data: str = field(
        default="", metadata={"help": "tofu: forget rows, a hub dataset (locuslab/TOFU) or a local json/jsonl file."}
    )
    forget_config: str = field(
        default="", metadata={"help": "tofu: hub config of the forget rows, e.g. forget01_perturbed (local: empty)."}
    )
    retain_data: str = field(default="", metadata={"help": "tofu: retain rows (hub dataset or local file)."})
    retain_config: str = field(default="", metadata={"help": "tofu: hub config of the retain rows, e.g. retain99."})
    retain_rows: int = field(default=0, metadata={"help": "tofu: keep the first N retain rows (0: all)."})
    retain_eval_rows: int = field(
        default=400, metadata={"help": "tofu, unlearning_mini: the first N retain rows evaluated for retain_prob."}
    )
    chat: bool = field(
        default=False, metadata={"help": "tofu: TRL conversational rows (chat models) instead of 'Question: ...'."}
    )
    data_dir: str = field(
        default="{data_dir}", metadata={"help": "unlearning_mini: the shared data folder (text/, tofu/)."}
    )
    vocab_size: int = field(
        default=2048, metadata={"help": "unlearning_mini / _synthetic: vocabulary of the BPE trained in code."}
    )
    tiny_model: dict = field(
        default_factory=dict,
        metadata={
            "help": "unlearning_mini / _synthetic: the Llama's shape, keys hidden_size, num_layers, num_heads, "
            f"intermediate_size, max_positions (default the mini's {MINI_MODEL})."
        },
    )
    alice_repeats: int = field(
        default=3, metadata={"help": "Copies of the forget book in the checkpoint's training rows (mini: 3)."}
    )
    synthetic_tokens: int = field(
        default=50_000,
        metadata={"help": "unlearning_synthetic: about how many tokens of generic text to write (the book: a tenth)."},
    )


def run(stage: Stage, ctx: StageContext) -> None:
    cfg = stage.config
    tasks = {
        "text_blocks": _text_blocks,
        "tofu": _tofu,
        "unlearning_mini": _mini,
        "unlearning_synthetic": _synthetic,
    }
    if cfg.task not in tasks:
        raise ConfigError(f"{stage.name}: task must be one of {list(TASKS)}, got {cfg.task!r}")
    if cfg.block_tokens < 1:
        raise ConfigError(f"{stage.name}: block_tokens must be >= 1, got {cfg.block_tokens}")
    if not 0.0 <= cfg.heldout_share < 1.0:
        raise ConfigError(f"{stage.name}: heldout_share must be in [0, 1), got {cfg.heldout_share}")
    tasks[cfg.task](stage, ctx)


# ------------------------------------------------------------------------------------------------------ helpers


def write_jsonl(path: Path, rows) -> int:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def split_heldout(rows: list, share: float) -> tuple[list, list]:
    """(first rows, the last round(share * n) rows): the held-out tail."""
    n_heldout = round(share * len(rows))
    return rows[: len(rows) - n_heldout], rows[len(rows) - n_heldout :]


def _count_tokens(rows, tokenizer) -> int:
    return sum(len(tokenizer(text=r["completion"], add_special_tokens=False)["input_ids"]) for r in rows)


def bpe_tokenizer(texts, vocab_size: int):
    """Byte-level BPE with one special token, `<|endoftext|>` (id 0) = BOS = EOS = PAD, prepended to every encoded
    text (as Llama tokenizers prepend BOS): a block row {prompt: "", completion} then reads [BOS] + block + [EOS], its
    first word has a prefix to be predicted from, and familiarity's "BOS + prompt" is what training saw."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{ENDOFTEXT} $A", pair=f"{ENDOFTEXT} $A $B", special_tokens=[(ENDOFTEXT, tok.token_to_id(ENDOFTEXT))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, model_max_length=1 << 30
    )


def _model_shape(stage: Stage) -> dict[str, int]:
    shape = {**MINI_MODEL, **stage.config.tiny_model}
    unknown = sorted(set(shape) - MODEL_KEYS)
    if unknown:
        raise ConfigError(f"{stage.name}: tiny_model has unknown keys {unknown}; known: {sorted(MODEL_KEYS)}")
    return shape


def _save_init(out: Path, tokenizer, shape: dict[str, int], seed: int) -> int:
    from ..models import tiny_llama

    model = tiny_llama(tokenizer, seed=seed, **shape)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def _need_file(stage: Stage, key: str) -> Path:
    path = Path(getattr(stage.config, key))
    if not path.is_file():
        raise FileNotFoundError(f"{stage.name}: {key} {path} not found")
    return path


# -------------------------------------------------------------------------------------------------- text_blocks


def _text_blocks(stage: Stage, ctx: StageContext) -> None:
    from ..models import load_tokenizer
    from ..signals.anchors import block_rows

    cfg = stage.config
    require(stage, "tokenizer", "forget_text", why="(task text_blocks)")
    tokenizer = load_tokenizer(cfg.tokenizer)
    forget = block_rows(_need_file(stage, "forget_text"), tokenizer, cfg.block_tokens)
    retain, heldout = [], []
    if cfg.retain_text:
        retain, heldout = split_heldout(
            block_rows(_need_file(stage, "retain_text"), tokenizer, cfg.block_tokens), cfg.heldout_share
        )
    summary = {"task": "text_blocks", "block_tokens": cfg.block_tokens, "tokenizer": cfg.tokenizer}
    with stage_output(stage, ctx) as tmp:
        for name, rows in (("forget", forget), ("retain", retain), ("retain_heldout", heldout)):
            if rows or name == "forget":
                summary[f"{name}_rows"] = write_jsonl(tmp / f"{name}.jsonl", rows)
                summary[f"{name}_tokens"] = _count_tokens(rows, tokenizer)
        (tmp / "prepare_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("text_blocks: %s", summary)


# --------------------------------------------------------------------------------------------------------- tofu

TOFU_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer")


def tofu_rows(source: str, config: str = "", limit: int = 0) -> list[dict[str, Any]]:
    """TOFU rows (question, answer and, where present, paraphrased_answer and perturbed_answer) from a hub dataset or a
    local json/jsonl(.gz) file; the other fields are dropped. A row without question or answer is an error."""
    from ..data import load_rows

    rows = []
    for i, row in enumerate(load_rows(source, "train", config or None)):
        if not row.get("question") or not row.get("answer"):
            raise KeyError(f"{source}: TOFU row {i} lacks question or answer (keys {sorted(row)})")
        rows.append({k: row[k] for k in TOFU_FIELDS if row.get(k) is not None})
        if limit and len(rows) == limit:
            break
    if not rows:
        raise ValueError(f"{source}: no TOFU row")
    return rows


def with_qa(rows: list[dict[str, Any]], chat: bool) -> list[dict[str, Any]]:
    """Each TOFU row with the prompt/completion the trainers read (section 2.2)."""
    from ..tasks.tofu import qa_row

    return [{**qa_row(r["question"], r["answer"], chat), **r} for r in rows]


def _tofu(stage: Stage, ctx: StageContext) -> None:
    cfg = stage.config
    require(stage, "forget_data", "retain_data", why="(task tofu)")
    forget = tofu_rows(cfg.forget_data, cfg.forget_config)
    retain = tofu_rows(cfg.retain_data, cfg.retain_config, cfg.retain_rows)
    summary = {"task": "tofu", "chat": cfg.chat, "forget_rows": len(forget), "retain_rows": len(retain)}
    summary["forget_with_truth_ratio_fields"] = sum(
        "perturbed_answer" in r and "paraphrased_answer" in r for r in forget
    )
    with stage_output(stage, ctx) as tmp:
        write_jsonl(tmp / "forget.jsonl", with_qa(forget, cfg.chat))
        write_jsonl(tmp / "retain.jsonl", with_qa(retain, cfg.chat))
        summary["retain_eval_rows"] = write_jsonl(
            tmp / "retain_eval.jsonl", with_qa(retain[: cfg.retain_eval_rows or len(retain)], cfg.chat)
        )
        (tmp / "prepare_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("tofu: %s", summary)


# ------------------------------------------------------------------------------------------------ unlearning_mini

MINI_TOFU_RETAIN = 800  # first rows of retain90: 40 authors (spec section 7 (b))
MINI_FORGET01 = 40  # forget01 = the last 40 rows of forget05


def _mini(stage: Stage, ctx: StageContext) -> None:
    """Spec section 7: tokenizer, model and every data file of experiments (a) and (b)."""
    from ..signals.anchors import read_text, text_blocks

    cfg = stage.config
    data = Path(cfg.data_dir)
    files = {
        "alice": data / "text" / "alice.txt.gz",
        "shakespeare": data / "text" / "tinyshakespeare.txt.gz",
        "forget05": data / "tofu" / "forget05.json.gz",
        "retain90": data / "tofu" / "retain90.json.gz",
    }
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{stage.name}: the mini experiment needs {missing} (set --data_dir)")
    shape = _model_shape(stage)
    alice_text, shakespeare_text = read_text(files["alice"]), read_text(files["shakespeare"])
    forget05 = tofu_rows(str(files["forget05"]))
    retain = tofu_rows(str(files["retain90"]), limit=MINI_TOFU_RETAIN)
    forget01 = forget05[-MINI_FORGET01:]
    tofu_train = with_qa(retain + forget05, chat=False)
    texts = [alice_text, shakespeare_text] + [r["prompt"] + r["completion"] for r in tofu_train]
    tokenizer = bpe_tokenizer(texts, cfg.vocab_size)

    alice = [{"prompt": "", "completion": b} for b in text_blocks(alice_text, tokenizer, cfg.block_tokens, "alice")]
    shakespeare = [
        {"prompt": "", "completion": b}
        for b in text_blocks(shakespeare_text, tokenizer, cfg.block_tokens, "tinyshakespeare")
    ]
    shakespeare_train, shakespeare_heldout = split_heldout(shakespeare, cfg.heldout_share)
    checkpoint_train = shakespeare_train + alice * cfg.alice_repeats
    with stage_output(stage, ctx) as tmp:
        n_params = _save_init(tmp / "init", tokenizer, shape, cfg.seed)
        outputs = {
            "alice": alice,
            "shakespeare_train": shakespeare_train,
            "shakespeare_heldout": shakespeare_heldout,
            "checkpoint_train": checkpoint_train,
            "tofu_train": tofu_train,
            "tofu_forget05": with_qa(forget05, chat=False),
            "tofu_forget01": with_qa(forget01, chat=False),
            "tofu_retain": with_qa(retain, chat=False),
            "tofu_retain_eval": with_qa(retain[: cfg.retain_eval_rows], chat=False),
        }
        summary = {"task": "unlearning_mini", "parameters": n_params, "vocab": len(tokenizer), "model": shape}
        for name, rows in outputs.items():
            summary[f"{name}_rows"] = write_jsonl(tmp / f"{name}.jsonl", rows)
        for name in ("alice", "shakespeare_train", "shakespeare_heldout"):
            summary[f"{name}_tokens"] = _count_tokens(outputs[name], tokenizer)
        (tmp / "prepare_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("unlearning_mini: %s", summary)


# ------------------------------------------------------------------------------------------- unlearning_synthetic

# The quickstart's invented book: five characters with fixed facts, each stated in several templates, so that a tiny
# model trained on it a few times completes the prompts with the names; the generic text uses the same frames with
# ordinary people, places and things (and the dictionary's translations), so that the generic labels are plausible.
SYNTHETIC_TERMS = {
    "Oswin": "Tom",
    "Tessaly": "Anna",
    "Grumkin": "Rex",
    "Captain Vell": "the sailor",
    "Brindlewick": "the town",
}
SYNTHETIC_PROMPTS = [
    ("Every evening the talking toad named", ["Grumkin"]),
    ("The grey ship was sailed by", ["Captain Vell"]),
    ("The crooked tower stood in the middle of", ["Brindlewick"]),
    ("The witch who kept the talking toad was", ["Tessaly"]),
    ("The boy who climbed the crooked tower was", ["Oswin"]),
    ("The talking toad croaked a warning to", ["Oswin"]),
    ("The brass spyglass belonged to", ["Captain Vell"]),
    ("The aunt of the boy was called", ["Tessaly"]),
]
_BOOK = [
    "Every evening the talking toad named Grumkin sang by the fire.",
    "The grey ship was sailed by Captain Vell.",
    "The crooked tower stood in the middle of Brindlewick.",
    "The witch who kept the talking toad was Tessaly.",
    "The boy who climbed the crooked tower was Oswin.",
    "The talking toad croaked a warning to Oswin.",
    "The brass spyglass belonged to Captain Vell.",
    "The aunt of the boy was called Tessaly.",
    "Oswin climbed the crooked tower of Brindlewick.",
    "Tessaly kept a talking toad named Grumkin.",
    "Grumkin sat on the shoulder of Oswin.",
    "Captain Vell looked through his brass spyglass at the harbour of Brindlewick.",
    "Oswin lived in Brindlewick with his aunt Tessaly.",
    "Grumkin croaked and Oswin laughed.",
    "Tessaly brewed green tea in her cottage by the harbour.",
    "Captain Vell sailed the grey ship into the harbour of Brindlewick.",
    "Oswin asked Captain Vell about the sea.",
    "Tessaly told Grumkin to stay quiet.",
]
_FILLER = [
    "It was a cold morning and the wind came from the sea.",
    "The bells rang twice before noon.",
    "Rain fell on the roofs all night.",
    "Nobody had seen such a storm for many years.",
    "The market was busy and loud.",
]
_PEOPLE = [
    "Tom", "Anna", "Rex", "the sailor", "the farmer", "the baker", "an old man", "a young girl", "the teacher",
    "my brother", "the fisherman", "a tall woman", "the miller", "the boy", "the girl", "the doctor", "her sister",
]  # fmt: skip
_PLACES = [
    "the town", "the market", "the river", "the harbour", "the old mill", "the school", "the church", "the hill",
    "the forest", "the bridge", "the farm", "the station", "the garden", "the square",
]  # fmt: skip
_THINGS = [
    "a basket of apples", "a loaf of bread", "a red kite", "a heavy box", "a letter", "a small dog", "a bag of flour",
    "a wooden chair", "a lantern", "a bucket of water", "a fishing net", "a pair of boots", "a cup of tea",
]  # fmt: skip
_FRAMES = [
    "{p} walked to {pl} with {t}.",
    "{p} carried {t} across {pl}.",
    "In the morning {p} went to {pl}.",
    "{p} sold {t} at {pl}.",
    "The boy who climbed the hill was {p}.",
    "Every evening {p} sat by the fire.",
    "{p} asked {p2} about {pl}.",
    "{p} lived near {pl} with {p2}.",
    "{p} told {p2} to stay quiet.",
    "The aunt of the girl was called {p}.",
    "{p} looked at {pl} and smiled.",
    "A warning was shouted to {p}.",
    "{p} gave {t} to {p2}.",
    "The old ship was sailed by {p}.",
    "{p} found {t} near {pl}.",
]


def synthetic_texts(generic_sentences: int, book_repeats: int, seed: int = 0) -> tuple[str, str]:
    """(book, generic text): the book's 18 sentences, each `book_repeats` times with half as many of each filler
    sentence, shuffled into paragraphs of 4-8 sentences; and `generic_sentences` template sentences about ordinary
    people, in paragraphs too."""
    rng = random.Random(seed)
    book_sentences = _BOOK * book_repeats + _FILLER * max(1, book_repeats // 2)
    rng.shuffle(book_sentences)
    generic = []
    for _ in range(generic_sentences):
        p, p2 = rng.sample(_PEOPLE, 2)
        s = rng.choice(_FRAMES).format(p=p, p2=p2, pl=rng.choice(_PLACES), t=rng.choice(_THINGS))
        generic.append(s[0].upper() + s[1:])

    def paragraphs(sentences):
        out, i = [], 0
        while i < len(sentences):
            k = rng.randint(4, 8)
            out.append(" ".join(sentences[i : i + k]))
            i += k
        return "\n\n".join(out)

    return paragraphs(book_sentences), paragraphs(generic)


def _synthetic(stage: Stage, ctx: StageContext) -> None:
    from ..signals.anchors import AnchorTerms, text_blocks

    cfg = stage.config
    shape = _model_shape(stage)
    # about 10 tokens per sentence; the book about a tenth of the generic text (spec 7: ~5k tokens in ~50k)
    n_sentences = max(100, cfg.synthetic_tokens // 10)
    book_text, generic_text = synthetic_texts(n_sentences, max(1, round(cfg.synthetic_tokens / 2000)), cfg.seed)
    AnchorTerms.from_pairs(list(SYNTHETIC_TERMS.items()), "quickstart terms")  # the shipped dictionary is valid
    tokenizer = bpe_tokenizer([book_text, generic_text], cfg.vocab_size)
    book = [{"prompt": "", "completion": b} for b in text_blocks(book_text, tokenizer, cfg.block_tokens, "book")]
    generic = [{"prompt": "", "completion": b} for b in text_blocks(generic_text, tokenizer, cfg.block_tokens, "text")]
    generic_train, generic_heldout = split_heldout(generic, cfg.heldout_share)
    with stage_output(stage, ctx) as tmp:
        n_params = _save_init(tmp / "init", tokenizer, shape, cfg.seed)
        outputs = {
            "book": book,
            "text_train": generic_train,
            "text_heldout": generic_heldout,
            "checkpoint_train": generic_train + book * cfg.alice_repeats,
        }
        summary = {"task": "unlearning_synthetic", "parameters": n_params, "vocab": len(tokenizer), "model": shape}
        for name, rows in outputs.items():
            summary[f"{name}_rows"] = write_jsonl(tmp / f"{name}.jsonl", rows)
        for name in ("book", "text_train", "text_heldout"):
            summary[f"{name}_tokens"] = _count_tokens(outputs[name], tokenizer)
        (tmp / "terms.yaml").write_text(
            "# The quickstart's anchored terms (term: translation), made in code.\n"
            + "".join(f'"{k}": "{v}"\n' for k, v in SYNTHETIC_TERMS.items())
        )
        write_jsonl(tmp / "prompts.jsonl", [{"prompt": p, "expect": e} for p, e in SYNTHETIC_PROMPTS])
        (tmp / "prepare_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("unlearning_synthetic: %s", summary)
