"""Data: load rows, tokenise them exactly as TRL's SFTTrainer does, carry token-aligned signal columns, collate.

The signal contract (DESIGN.md). A scoring pass stores, per row, `completion_ids` (the target tokens as the trainer
tokenises the row) and per-token signals of the same length (`ref_logps`, `token_weights`, ...). Before training, the
trainer tokenises each row itself, checks its completion tokens against the stored ids (`SignalAlignmentError` names
the row and the first differing position), and expands each signal to the full row: S[p] is the signal of the token at
input position p, 0.0 on prompt and padding. Truncation, padding, padding-free and bfd packing then treat the signal
exactly like `input_ids`, so it stays aligned by construction.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_dataset, load_from_disk
from trl.data_utils import _tokenize, common_prefix_length, is_conversational, pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from .tokens import IGNORE_INDEX

logger = logging.getLogger(__name__)

META_FILE = "signal_meta.json"


class SignalAlignmentError(ValueError):
    """Stored signal ids differ from the trainer's own tokenisation of the row."""


# ----------------------------------------------------------------------------------------------------------- loading


def load_rows(source: str | Path, split: str = "train", name: str | None = None) -> Dataset:
    """Rows from a local jsonl/json/csv file (gzip ok), a folder written by a tokentrain stage, or a hub dataset."""
    path = Path(str(source))
    # "train[:64]": the split's name, and a slice that local files honour as hub datasets do
    name_part, _, rest = split.partition("[")
    part = "train" + ("[" + rest if rest else "")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return load_from_disk(str(path))
        files = sorted(p for p in path.iterdir() if _file_format(p) is not None)
        if not files:
            raise FileNotFoundError(f"{path} holds no dataset: expected a saved dataset or jsonl/json/csv files")
        named = [p for p in files if p.name.split(".")[0] == name_part]
        if named:  # a folder of split files (train.jsonl.gz, test.jsonl.gz, ...): the one `split` names
            files = named
        elif len(files) > 1 and any(p.name.split(".")[0] in ("train", "test", "validation") for p in files):
            raise FileNotFoundError(f"{path} has no file for split {name_part!r} (files: {[p.name for p in files]})")
        for p in files:
            _check_file(p)
        return load_dataset(_file_format(files[0]), data_files=[str(p) for p in files], split=part)
    if path.exists():
        fmt = _file_format(path)
        if fmt is None:
            raise ValueError(f"{path}: unknown file type; use .jsonl, .json or .csv (optionally .gz)")
        _check_file(path)
        return load_dataset(fmt, data_files=str(path), split=part)
    if str(source).startswith((".", "/")) or str(source).endswith((".jsonl", ".json", ".csv", ".gz")):
        raise FileNotFoundError(f"dataset file not found: {source}")
    return load_dataset(str(source), name, split=split)  # hub dataset name


def _check_file(path: Path) -> None:
    """A local file must hold rows: an empty file, or a jsonl line that is not a JSON object, is an error naming the
    file and line (the json loader would fail later with a message about Arrow schemas)."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    suffixes = [s for s in path.suffixes if s != ".gz"]
    with opener(path, "rt", encoding="utf-8") as f:
        if suffixes and suffixes[-1] == ".jsonl":
            rows = 0
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}, line {number}: a row must be a JSON object, got {type(row).__name__}")
                rows += 1
            if rows == 0:
                raise ValueError(f"{path} holds no rows")
        elif not f.read(1).strip() and not f.read(4096).strip():
            raise ValueError(f"{path} is empty")


def _file_format(path: Path) -> str | None:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    ext = suffixes[-1] if suffixes else ""
    return {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(ext)


def apply_templates(dataset: Dataset, prompt_template: str = "", completion_template: str = "") -> Dataset:
    """Add `prompt` / `completion` built from each row's columns with str.format templates (hub datasets such as
    GSM8K's question/answer). A template naming a missing column is an error naming it and the row."""
    if not prompt_template and not completion_template:
        return dataset

    def build(example, idx):
        out = {}
        for key, template in (("prompt", prompt_template), ("completion", completion_template)):
            if template:
                try:
                    out[key] = template.format(**example)
                except KeyError as e:
                    raise KeyError(f"row {idx}: {key}_template names column {e} (columns: {sorted(example)})") from None
        return out

    return dataset.map(build, with_indices=True, desc="Formatting rows")


def require_columns(dataset: Dataset, columns: list[str], hint: str = "") -> None:
    """Raise naming every missing column (and the stage that writes it, via `hint`)."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise KeyError(f"dataset lacks column(s) {missing} (has {dataset.column_names}){'; ' + hint if hint else ''}")


def prompt_ids(example: dict[str, Any], tokenizer, chat_template: str | None = None) -> list[int]:
    """The prompt as `tokenize_row` tokenises it (with the generation prompt for chat rows): what generation reads."""
    prompt = example["prompt"]
    if isinstance(prompt, list):
        return list(_tokenize(tokenizer, prompt, add_generation_prompt=True, chat_template=chat_template)["input_ids"])
    return list(_tokenize(tokenizer, prompt, chat_template=chat_template)["input_ids"])


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(source: str | Path) -> dict[str, Any] | None:
    path = Path(str(source))
    meta = path / META_FILE if path.is_dir() else path.with_name(META_FILE)
    return json.loads(meta.read_text()) if meta.exists() else None


# ------------------------------------------------------------------------------------------------------ tokenisation


def row_kind(example: dict[str, Any]) -> str:
    """'prompt_completion', 'messages' or 'text': the three row formats (chat or plain) tokentrain accepts."""
    if "prompt" in example and "completion" in example:
        return "prompt_completion"
    if "messages" in example:
        return "messages"
    if "text" in example:
        return "text"
    raise KeyError(f"row has none of prompt+completion, messages, text (keys: {sorted(example)})")


ROW_COLUMNS = ("prompt", "completion", "messages", "text")


def check_rows(dataset: Dataset, name: str = "train") -> None:
    """Every row of one kind (prompt/completion, messages or text; plain or chat) with values of the right type: an
    error names the row and column (a null prompt, a completion that is not a string, a file mixing row kinds)."""
    columns = [c for c in ROW_COLUMNS if c in dataset.column_names]
    if not columns:
        raise KeyError(f"{name} rows have none of prompt+completion, messages, text (columns: {dataset.column_names})")
    first = None
    for i, row in enumerate(dataset.select_columns(columns)):
        present = {k for k, v in row.items() if v is not None}
        if {"prompt", "completion"} <= present:
            kind = "prompt_completion"
            p, c = row["prompt"], row["completion"]
            if isinstance(p, str) != isinstance(c, str) or not isinstance(p, (str, list)):
                raise ValueError(
                    f"{name} row {i}: prompt and completion must both be strings or both lists of chat messages, got "
                    f"{type(p).__name__} and {type(c).__name__}"
                )
        elif "messages" in present:
            kind = "messages"
        elif "text" in present:
            kind = "text"
            if not isinstance(row["text"], str):
                raise ValueError(f"{name} row {i}: column 'text' must be a string, got {type(row['text']).__name__}")
        else:
            missing = [c for c in ("prompt", "completion") if c in columns and c not in present]
            raise ValueError(
                f"{name} row {i}: no usable row: "
                + (f"{' and '.join(missing)} is null" if missing else f"every one of {columns} is null")
            )
        for column in ("prompt", "completion", "messages"):
            value = row.get(column)
            if isinstance(value, list) and not all(isinstance(m, dict) and "role" in m for m in value):
                raise ValueError(f"{name} row {i}: column {column!r} must be a list of {{role, content}} messages")
        if first is None:
            first = (i, kind)
        elif kind != first[1]:
            raise ValueError(
                f"{name} row {i} is a {kind} row but row {first[0]} is a {first[1]} row: one dataset holds one kind"
            )


def tokenize_row(
    example: dict[str, Any], tokenizer, chat_template: str | None = None, assistant_only_loss: bool = False
) -> dict[str, list[int]]:
    """`input_ids` and `labels` (-100 where no loss) exactly as TRL 1.16 SFTTrainer prepares the row.

    Plain text: EOS appended to the completion (or text) unless present; the completion starts where the tokenised
    prompt and prompt+completion diverge (`common_prefix_length`). Chat rows go through the chat template with the
    row's `tools` and `chat_template_kwargs`, as TRL passes them. Language modelling rows (`text`, `messages`) train on
    every token; with `assistant_only_loss` (chat rows only, as TRL) only on the tokens the template marks as the
    assistant's (`{% generation %}`), a row without any being an error as in TRL. Tested against SFTTrainer's own
    preparation.
    """
    kind = row_kind(example)
    conversational = is_conversational(example)
    if assistant_only_loss and not conversational:
        raise ValueError("assistant_only_loss=True needs conversational rows (messages, or chat prompt/completion)")
    kwargs: dict[str, Any] = {"chat_template": chat_template}
    if conversational:
        tools = example.get("tools")
        kwargs["tools"] = json.loads(tools) if isinstance(tools, str) else tools
        kwargs.update(example.get("chat_template_kwargs") or {})
    mask_kwargs = {"return_assistant_tokens_mask": True} if assistant_only_loss else {}
    assistant = None
    if kind == "prompt_completion":
        prompt, completion = example["prompt"], example["completion"]
        if conversational:
            prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True, **kwargs)["input_ids"]
            processed = _tokenize(tokenizer, prompt + completion, **mask_kwargs, **kwargs)
            ids, assistant = processed["input_ids"], processed.get("assistant_masks")
        else:
            if not completion.endswith(tokenizer.eos_token):
                completion = completion + tokenizer.eos_token
            prompt_ids = _tokenize(tokenizer, prompt, **kwargs)["input_ids"]
            ids = _tokenize(tokenizer, prompt + completion, **kwargs)["input_ids"]
        prompt_len = common_prefix_length(prompt_ids, ids)
        labels = [IGNORE_INDEX] * prompt_len + list(ids[prompt_len:])
    else:
        if kind == "messages":
            processed = _tokenize(tokenizer, example["messages"], **mask_kwargs, **kwargs)
            ids, assistant = processed["input_ids"], processed.get("assistant_masks")
        else:
            text = example["text"]
            if not text.endswith(tokenizer.eos_token):
                text = text + tokenizer.eos_token
            ids = _tokenize(tokenizer, text, **kwargs)["input_ids"]
        labels = list(ids)
    if assistant_only_loss:
        if assistant is None or 1 not in assistant:
            raise ValueError(
                "assistant_only_loss=True, but a row has no assistant tokens: the chat template must mark the "
                "assistant's turns with {% generation %} ... {% endgeneration %} (TRL raises the same)"
            )
        labels = [lab if bit else IGNORE_INDEX for lab, bit in zip(labels, assistant)]
    return {"input_ids": list(ids), "labels": labels}


def context_ids_of(input_ids: list[int], labels: list[int]) -> list[int]:
    """The row's tokens that are not targets, in order (a prompt/completion row: its prompt): the context the stored
    signals were computed in, which `prompt_ids` holds beside `completion_ids`."""
    return [t for p, (t, lab) in enumerate(zip(input_ids, labels)) if p == 0 or lab == IGNORE_INDEX]


def completion_ids_of(input_ids: list[int], labels: list[int]) -> list[int]:
    """The target tokens: input_ids[p] for p >= 1 with labels[p] != -100 (the fused head's valid targets)."""
    return [t for t, lab in zip(input_ids[1:], labels[1:]) if lab != IGNORE_INDEX]


def target_positions(labels: list[int]) -> list[int]:
    return [p for p in range(1, len(labels)) if labels[p] != IGNORE_INDEX]


# ---------------------------------------------------------------------------------------------------- signal columns


# Token weights above this draw a warning (a weight multiplies its token's step, like a learning-rate factor).
WEIGHT_WARN = 100.0


def _numbers(values, row: int, column: str) -> list:
    for j, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"row {row}, column {column!r}, position {j}: {v!r} is not a number")
    return values


def _check_logps(values: list[float], row: int, column: str) -> list[float]:
    out = []
    for j, v in enumerate(_numbers(values, row, column)):
        if not math.isfinite(v) or v > 1e-6:
            raise ValueError(
                f"row {row}, column {column!r}, position {j}: {v!r} is not a log-probability (finite, <= 0)"
            )
        out.append(min(v, 0.0))  # values in (0, 1e-6] are float rounding
    return out


def _check_weights(values: list[float], row: int, column: str) -> list[float]:
    for j, v in enumerate(_numbers(values, row, column)):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"row {row}, column {column!r}, position {j}: weight {v!r} must be finite and >= 0")
    return list(values)


# Per-token signal columns and the check their values get. Each is aligned to the ids column named beside it.
SIGNAL_CHECKS = {
    "ref_logps": _check_logps,
    "token_weights": _check_weights,
    "chosen_weights": _check_weights,
    "rejected_weights": _check_weights,
}


def check_alignment(stored: list[int], own: list[int], row: int, column: str, tokenizer) -> None:
    """Stored signal ids must equal the trainer's own tokens; the error shows the first difference."""
    if stored is None or any(isinstance(t, bool) or not isinstance(t, int) for t in stored):
        bad = (
            "None" if stored is None else repr(next(t for t in stored if isinstance(t, bool) or not isinstance(t, int)))
        )
        raise SignalAlignmentError(f"row {row}: column {column!r} must hold integer token ids, found {bad}")
    if list(stored) == list(own):
        return
    j = next((i for i, (a, b) in enumerate(zip(stored, own)) if a != b), min(len(stored), len(own)))

    def show(ids, j):
        return f"{ids[j]} {tokenizer.decode([ids[j]])!r}" if j < len(ids) else "<end>"

    raise SignalAlignmentError(
        f"row {row}: stored {column!r} differ from this trainer's tokenisation at position {j} "
        f"(stored {show(stored, j)}, trainer {show(own, j)}; lengths {len(stored)} vs {len(own)}). "
        "Typical cause: signals scored with another tokenizer, chat template or prompt format; re-run the score stage."
    )


def _is_empty_completion(example: dict[str, Any], tokenizer) -> bool:
    """An empty completion ("" or EOS alone, or empty assistant messages), on which TRL would train the EOS alone."""
    if row_kind(example) != "prompt_completion":
        return False
    completion = example["completion"]
    if isinstance(completion, list):
        return all(not message.get("content") for message in completion)
    return completion in ("", tokenizer.eos_token)


def prepare_sft_dataset(
    dataset: Dataset,
    tokenizer,
    signal_columns: tuple[str, ...] = (),
    ids_column: str = "completion_ids",
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    packing: bool = False,
    chat_template: str | None = None,
    name: str = "train",
    assistant_only_loss: bool = False,
) -> Dataset:
    """Tokenise rows, verify and expand signals to full-row columns, truncate them with the tokens, drop empty rows.

    With signal columns, the stored `completion_ids` (and `prompt_ids`, the row's other tokens, when the scoring pass
    wrote them) must equal this tokenisation: the signals' targets and the context they were computed in. Output
    columns: `input_ids`, `labels` and one float column per signal (same length as `input_ids`; packed with
    `seq_lengths` when `packing`, which is always TRL's `bfd`: sequences are never split, so per-sequence quantities
    stay whole). Rows whose completion is empty or fully truncated are dropped and counted in the log.
    """
    if signal_columns:
        require_columns(dataset, [ids_column, *signal_columns], hint="the score stage writes them (`tokentrain score`)")
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {truncation_mode!r}")
    check_rows(dataset, name)
    zero_weight_rows, large_weight_rows = [], []
    check_prompt = bool(signal_columns) and "prompt_ids" in dataset.column_names

    def process(example, idx):
        out = tokenize_row(example, tokenizer, chat_template, assistant_only_loss)
        ids, labels = out["input_ids"], out["labels"]
        if signal_columns:
            own = completion_ids_of(ids, labels)
            check_alignment(example[ids_column], own, idx, ids_column, tokenizer)
            if check_prompt:
                check_alignment(example["prompt_ids"], context_ids_of(ids, labels), idx, "prompt_ids", tokenizer)
            positions = target_positions(labels)
            for col in signal_columns:
                values = example[col]
                if values is None or len(values) != len(own):
                    n = None if values is None else len(values)
                    raise ValueError(f"row {idx}: column {col!r} has {n} values but {ids_column!r} has {len(own)}")
                values = SIGNAL_CHECKS.get(col, _check_weights)(values, idx, col)
                if col in ("token_weights",) and own and not any(values):
                    zero_weight_rows.append(idx)
                if col.endswith("weights") and values and max(values) > WEIGHT_WARN:
                    large_weight_rows.append((idx, max(values)))
                full = [0.0] * len(ids)
                for p, v in zip(positions, values):
                    full[p] = float(v)
                out[col] = full
        if max_length is not None and len(ids) > max_length:
            # Packing cuts here too, keeping the start as TRL's bfd does (it ignores truncation_mode), so that a row
            # whose completion lies wholly past max_length is counted and dropped below instead of packed empty.
            keep_start = truncation_mode == "keep_start" or packing
            sl = slice(None, max_length) if keep_start else slice(-max_length, None)
            out = {k: v[sl] for k, v in out.items()}
        n_targets = sum(1 for lab in out["labels"][1:] if lab != IGNORE_INDEX)
        out["_n_targets"] = 0 if _is_empty_completion(example, tokenizer) else n_targets
        return out

    keep = ["input_ids", "labels", *signal_columns]
    processed = dataset.map(
        process,
        with_indices=True,
        remove_columns=dataset.column_names,
        desc=f"Tokenising {name} rows and aligning signals",
    )
    empty = [i for i, n in enumerate(processed["_n_targets"]) if n == 0]
    if empty:
        logger.warning(
            "%s: %d of %d rows have no completion token left (empty or fully truncated) and are dropped; first: %s",
            name,
            len(empty),
            len(processed),
            empty[:10],
        )
        processed = processed.filter(lambda n: n > 0, input_columns="_n_targets")
    if zero_weight_rows:
        logger.warning(
            "%s: %d rows have all token weights 0 (they contribute nothing); first: %s",
            name,
            len(zero_weight_rows),
            zero_weight_rows[:10],
        )
    if large_weight_rows:
        top = max(large_weight_rows, key=lambda r: r[1])
        logger.warning(
            "%s: %d rows have token weights above %g (largest %g, row %d): a weight that large multiplies the "
            "learning rate of its token; check the weights are meant to be on this scale",
            name,
            len(large_weight_rows),
            WEIGHT_WARN,
            top[1],
            top[0],
        )
    processed = processed.select_columns(keep)
    if packing:
        if max_length is None:
            raise ValueError("packing needs max_length")
        processed = pack_dataset(processed, max_length, "bfd")
    return processed


# -------------------------------------------------------------------------------------------------------- collation


class SignalCollator(DataCollatorForLanguageModeling):
    """TRL's language-modelling collator, plus float signal columns laid out like `input_ids`.

    Padded: right-padded with 0.0 (neutral: masked by labels anyway). Padding-free: concatenated like `input_ids`.
    """

    def __init__(self, *args, signal_columns: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.signal_columns = tuple(signal_columns)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        width = batch["input_ids"].shape[1]
        for col in self.signal_columns:
            if col not in examples[0]:  # eval rows carry no signals (train rows are checked when prepared)
                continue
            rows = [torch.tensor(ex[col], dtype=torch.float32) for ex in examples]
            if self.padding_free:
                rows = [torch.cat(rows)]
            out = torch.zeros(len(rows), width, dtype=torch.float32)
            for i, r in enumerate(rows):
                out[i, : r.numel()] = r
            batch[col] = out  # (B, T) like input_ids
        return batch


# ------------------------------------------------------------------------------------------- preference split (DPO)


def check_pair_prompt(example: dict[str, Any], row: int) -> None:
    """Chat rows: chosen and rejected must answer one shared prompt, so each must start with the assistant's reply.

    With an explicit `prompt`, a completion that starts with another role repeats or changes the prompt. Without one,
    TRL takes the messages the two have in common as the prompt: when their user turns differ, that "prompt" stops
    early and each completion carries its own question, which TRL would train on silently. Plain-text rows share an
    explicit prompt by construction; an implicit text prompt (the common character prefix) cannot be checked.
    """
    chosen, rejected = example["chosen"], example["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        return
    n_prompt = len(example["prompt"]) if "prompt" in example else None
    if n_prompt is None:
        from trl.data_utils import extract_prompt

        split = extract_prompt(example)
        chosen, rejected, n_shared = split["chosen"], split["rejected"], len(split["prompt"])
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages:
            raise ValueError(f"row {row}: {side} has no message after the prompt")
        role = messages[0].get("role") if isinstance(messages[0], dict) else None
        if role == "assistant":
            continue
        if n_prompt is None:
            raise ValueError(
                f"row {row}: chosen and rejected differ from message {n_shared} on, and {side}'s message {n_shared} is "
                f"a {role!r} message, not the reply: the two answer different prompts (give one `prompt` column)"
            )
        raise ValueError(
            f"row {row}: {side} starts with a {role!r} message: a completion must be the reply to `prompt` (the "
            "prompt's messages repeated or changed in the completion would be trained on as if generated)"
        )


def split_preference_row(example: dict[str, Any], tokenizer) -> dict[str, list[int]]:
    """`prompt_ids`, `chosen_ids`, `rejected_ids` of a preference row exactly as TRL 1.16 `DPOTrainer` splits it.

    The rule of `DPOTrainer._prepare_dataset` (spec critical_dpo section 2), row by row:
    - a row without `prompt` gets TRL's implicit-prompt extraction (the common start of chosen and rejected);
    - plain text: EOS appended to chosen and rejected unless they already end with it; prompt, prompt+chosen and
      prompt+rejected tokenised with the tokenizer's own call;
    - chat rows: the same three through the chat template, the prompt with `add_generation_prompt=True` (and the row's
      `tools` / `chat_template_kwargs`, as TRL passes them);
    - all three are cut at the smaller common-prefix length of the prompt with the two full sequences, so a prompt
      whose last token merges into a completion loses that token (which the completions then start with).
    Tested against TRL's own preparation. TRL decides plain vs chat once from the first row; here each row decides,
    which is the same on any dataset TRL accepts.
    """
    if "prompt" not in example:
        from trl.data_utils import extract_prompt

        example = {**example, **extract_prompt(example)}
    prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    if is_conversational(example):
        tools = example.get("tools")
        kwargs = {"tools": json.loads(tools) if isinstance(tools, str) else tools}
        kwargs.update(example.get("chat_template_kwargs") or {})
        prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True, **kwargs)["input_ids"]
        prompt_chosen_ids = _tokenize(tokenizer, prompt + chosen, **kwargs)["input_ids"]
        prompt_rejected_ids = _tokenize(tokenizer, prompt + rejected, **kwargs)["input_ids"]
    else:
        eos = tokenizer.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = _tokenize(tokenizer, prompt)["input_ids"]
        prompt_chosen_ids = _tokenize(tokenizer, prompt + chosen)["input_ids"]
        prompt_rejected_ids = _tokenize(tokenizer, prompt + rejected)["input_ids"]
    prompt_len = min(
        common_prefix_length(prompt_ids, prompt_chosen_ids), common_prefix_length(prompt_ids, prompt_rejected_ids)
    )
    return {
        "prompt_ids": list(prompt_ids[:prompt_len]),
        "chosen_ids": list(prompt_chosen_ids[prompt_len:]),
        "rejected_ids": list(prompt_rejected_ids[prompt_len:]),
    }
