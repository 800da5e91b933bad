"""`stage: prepare`, tasks `gsm8k_equations` and `synthetic_equations`: the data of the concept_heads mini experiment
(spec `specs/concept_heads.md` section 7) and of its quickstart, with the character tokenizer and the tiny Llama.

Writes to output_dir:
    train.jsonl       phase-2 rows {prompt: 'lhs=', completion: 'rhs'}, every occurrence (repeats kept)
    test.jsonl        distinct equations {prompt, completion, seen}: `seen` when it also occurs in train
    pretrain.jsonl    phase-0 rows {input_ids}: <bos> + `window_chars` characters at a random offset of the corpus
                      (pre-tokenised, so no <eos> is appended: a window ends nowhere)
    prompts.jsonl     phase-1 prompts {prompt}: question tails and text openings (gsm8k) or prose openings (synthetic)
    init/             the character tokenizer (<pad> 0, <bos> 1, <eos> 2, then the corpus' characters) and the
                      Llama of section 7: hidden 64, 4 layers, 4 heads, MLP 192, untied embeddings
    prepare_summary.json  counts (rows, distinct, seen / unseen, vocabulary, parameters)
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .base import ConfigError, Stage, StageConfig, StageContext, stage_output

logger = logging.getLogger(__name__)

TASKS = ("gsm8k_equations", "synthetic_equations")
MODEL_SHAPE = {"hidden_size": 64, "num_layers": 4, "num_heads": 4, "intermediate_size": 192, "max_positions": 256}


@dataclass
class Config(StageConfig):
    task: str = field(
        default="gsm8k_equations",
        metadata={"help": "'gsm8k_equations' ({data_dir}/gsm8k and text/) or 'synthetic_equations' (made in code)."},
    )
    data_dir: str = field(default="{data_dir}", metadata={"help": "Folder of the shared data (gsm8k_equations)."})
    pretrain_windows: int = field(
        default=12800, metadata={"help": "Phase-0 rows: random windows of the corpus (400 steps x 32 in the spec)."}
    )
    window_chars: int = field(default=96, metadata={"help": "Characters per phase-0 window (after <bos>)."})
    question_prompts: int = field(
        default=200, metadata={"help": "Phase-1 prompts from GSM8K train questions (synthetic: from the prose)."}
    )
    question_chars: int = field(
        default=80, metadata={"help": "Characters kept of each question's end (synthetic: of each opening)."}
    )
    text_prompts: int = field(default=100, metadata={"help": "gsm8k_equations: phase-1 prompts from Tiny Shakespeare."})
    text_chars: int = field(default=48, metadata={"help": "gsm8k_equations: characters of each Shakespeare opening."})
    num_train: int = field(default=4000, metadata={"help": "synthetic_equations: phase-2 train rows (with repeats)."})
    num_test: int = field(
        default=400, metadata={"help": "synthetic_equations: distinct test equations, half seen in train."}
    )
    pool: int = field(default=1500, metadata={"help": "synthetic_equations: distinct equations train draws from."})
    num_docs: int = field(default=3000, metadata={"help": "synthetic_equations: phase-0 prose documents."})


def run(stage: Stage, ctx: StageContext) -> None:
    from ..tasks import equations as eq

    cfg = stage.config
    if cfg.task not in TASKS:
        raise ConfigError(f"{stage.name}: task must be one of {list(TASKS)}, got {cfg.task!r}")
    for key in ("pretrain_windows", "window_chars", "question_prompts", "question_chars"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{stage.name}: {key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.task == "gsm8k_equations":
        train, test, docs, prompts = _gsm8k(stage)
    else:
        for key in ("num_train", "num_test", "pool", "num_docs"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"{stage.name}: {key} must be >= 1, got {getattr(cfg, key)}")
        train, test = eq.synthetic_equations(cfg.num_train, cfg.num_test, cfg.pool, cfg.seed)
        docs = eq.synthetic_corpus(cfg.num_docs, cfg.seed + 1)
        prompts = eq.sentence_openings(docs, cfg.question_prompts, cfg.question_chars, cfg.seed + 2)
    corpus = "\n".join(docs)
    tokenizer, model = _tokenizer_and_model(eq.alphabet(docs), cfg.seed)
    bos = tokenizer.bos_token_id
    windows = eq.windows(corpus, cfg.pretrain_windows, cfg.window_chars, cfg.seed + 3)
    with stage_output(stage, ctx) as tmp:
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "test.jsonl", test)
        _write_jsonl(tmp / "prompts.jsonl", [{"prompt": p} for p in prompts])
        _write_jsonl(
            tmp / "pretrain.jsonl",
            [{"input_ids": [bos, *tokenizer(w, add_special_tokens=False)["input_ids"]]} for w in windows],
        )
        model.save_pretrained(tmp / "init")
        tokenizer.save_pretrained(tmp / "init")
        summary = {
            "task": cfg.task,
            "train_rows": len(train),
            "train_distinct": len({(r["prompt"], r["completion"]) for r in train}),
            "test_rows": len(test),
            "test_seen": sum(r["seen"] for r in test),
            "test_unseen": sum(not r["seen"] for r in test),
            "max_answer_chars": max(len(r["completion"]) for r in test),
            "corpus_chars": len(corpus),
            "pretrain_rows": len(windows),
            "prompts": len(prompts),
            "vocab_size": len(tokenizer),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        (tmp / "prepare_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info(
        "%s: %d train rows (%d distinct), %d test equations (%d seen, %d unseen); %d phase-0 windows of a %d-character "
        "corpus, %d phase-1 prompts; vocabulary %d, %d parameters -> %s/init",
        cfg.task,
        summary["train_rows"],
        summary["train_distinct"],
        summary["test_rows"],
        summary["test_seen"],
        summary["test_unseen"],
        summary["pretrain_rows"],
        summary["corpus_chars"],
        summary["prompts"],
        summary["vocab_size"],
        summary["parameters"],
        cfg.output_dir,
    )


def _gsm8k(stage: Stage) -> tuple[list[dict], list[dict], list[str], list[str]]:
    """(train rows, test rows, phase-0 documents, phase-1 prompts) from the shared GSM8K and Tiny Shakespeare."""
    from ..tasks import equations as eq

    cfg = stage.config
    root = Path(cfg.data_dir)
    paths = [
        root / "gsm8k" / "train.jsonl.gz",
        root / "gsm8k" / "test.jsonl.gz",
        root / "text" / "tinyshakespeare.txt.gz",
    ]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{stage.name}: gsm8k_equations reads {missing} (the shared data folder): set data_dir, --data_dir or "
            "$TOKENTRAIN_DATA, or use task synthetic_equations (made in code)"
        )
    with gzip.open(paths[0], "rt") as f:
        train_rows = [json.loads(line) for line in f]
    with gzip.open(paths[1], "rt") as f:
        test_rows = [json.loads(line) for line in f]
    with gzip.open(paths[2], "rt") as f:
        shakespeare = f.read()
    train, test = eq.equation_rows([r["answer"] for r in train_rows], [r["answer"] for r in test_rows])
    questions = [r["question"] for r in train_rows]
    docs = [eq.ascii_only(shakespeare), *eq.gsm8k_corpus(questions, [r["answer"] for r in train_rows])]
    prompts = eq.question_tails(questions, cfg.question_prompts, cfg.question_chars, cfg.seed + 2)
    prompts += eq.text_openings(shakespeare, cfg.text_prompts, cfg.text_chars, cfg.seed + 4)
    return train, test, docs, prompts


def _tokenizer_and_model(chars: str, seed: int):
    """The character tokenizer of `chars` and the section-7 Llama on it (untied embeddings, seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..models import char_tokenizer

    tokenizer = char_tokenizer(chars)
    shape = MODEL_SHAPE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_heads"],
        intermediate_size=shape["intermediate_size"],
        max_position_embeddings=shape["max_positions"],
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return tokenizer, LlamaForCausalLM(config)


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
