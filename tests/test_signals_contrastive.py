"""Tests of signals/contrastive.py and data.split_preference_row (specs/critical_dpo.md section 2, property 7, section 9).

The split equals TRL 1.16's own DPO preparation (plain and chat rows, a prompt whose last token merges into the
completion); the scorer equals a naive full-softmax computation over the models' plain forward, whatever the chunk
size, batch size, padding or row order; the appended EOS gets weight 1.0; bad inputs raise naming the row or model.
Two different tiny Llamas (seeds 0 and 1) play the positive and negative models.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from tokentrain.data import check_pair_prompt, split_preference_row
from tokentrain.signals.contrastive import score_contrastive

ATOL = 1e-5
# Tiny models gain nothing from threads; on a loaded 2-core machine OpenMP spin-waiting slows them ~100x.
pytestmark = pytest.mark.usefixtures("one_thread")

# "in the river" + "side." tokenises as "... in the" + "riverside" + "."; the prompt alone ends with "river": the
# last prompt token merges into the completion, so TRL cuts the prompt there (on both sides of the pair).
MERGE = {"prompt": "<s>name[Aromi], area[riverside]<sep>Aromi is in the river", "chosen": "side.", "rejected": " Z."}


def plain_pairs(pc_rows) -> list[dict]:
    """21 plain pairs: the fixture's completions paired with a neighbour's, plus edge rows."""
    rows = []
    for i, row in enumerate(pc_rows):
        other = pc_rows[(i + 5) % len(pc_rows)]["completion"]
        other = other if other != row["completion"] else other + " Really."  # the fixture repeats some texts
        rows.append({"prompt": row["prompt"], "chosen": " " + row["completion"], "rejected": " " + other})
    rows += [
        MERGE,
        {**MERGE, "rejected": "side and more."},  # both sides merge
        {"prompt": "<s>name[Zizzi]<sep>", "chosen": "Zizzi.</s>", "rejected": "Cotto."},  # EOS already present
        {"prompt": "<s>name[Cotto]<sep>", "chosen": "Cotto serves food in the riverside.", "rejected": "No."},
        {"prompt": "<s>", "chosen": "x", "rejected": "a much longer rejected completion about the city centre."},
        {"prompt": "<s>name[The Mill], food[Indian]<sep>", "chosen": "The Mill.", "rejected": "The Mill serves"},
        {"prompt": "<s>name[Wildwood]<sep>Wild", "chosen": "wood is fine.", "rejected": "wood is not fine."},
        {"prompt": "<s>name[Aromi]<sep>", "chosen": " ", "rejected": "  "},
        {"prompt": "<s>area[city centre]<sep>In the city", "chosen": " centre.", "rejected": "centre."},
    ]
    return rows


def chat_pairs() -> list[dict]:
    questions = ["Where is Aromi?", "What food?", "Is it family friendly?", "Rating?", "Near the river?"]
    rows = []
    for i, q in enumerate(questions):
        rows.append(
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": f"Answer {i}: in the riverside."}],
                "rejected": [{"role": "assistant", "content": "No." * (i + 1)}],
            }
        )
    rows.append(  # a multi-turn prompt
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Aromi?"},
                {"role": "assistant", "content": "Italian."},
                {"role": "user", "content": "Area?"},
            ],
            "chosen": [{"role": "assistant", "content": "riverside"}],
            "rejected": [{"role": "assistant", "content": "city centre"}],
        }
    )
    return rows


def sharp_model(factory, seed):
    """A tiny model with its (tied) embeddings scaled up, so that scores spread over [0, 1] instead of sitting near
    1/V: a misplaced or shifted score then differs by far more than the tolerance."""
    model = factory(seed).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def models(tiny_model_factory):
    return sharp_model(tiny_model_factory, 0), sharp_model(tiny_model_factory, 1)


@torch.no_grad()
def naive_scores(pos, neg, prompt_ids, completion_ids, ce_beta):
    """s_t from the full (1, T, V) logits of both models' plain forward: softmax((1+b)z⁺ − b z⁻) at y_t, float64."""
    ids = torch.tensor([prompt_ids + completion_ids])
    z_pos = pos(input_ids=ids).logits[0].double()  # (T, V)
    z_neg = neg(input_ids=ids).logits[0].double()  # (T, V)
    probs = ((1 + ce_beta) * z_pos - ce_beta * z_neg).softmax(-1)  # (T, V)
    p = len(prompt_ids)
    return [probs[p + k - 1, t].item() for k, t in enumerate(completion_ids)]


def close(a, b, atol=ATOL):
    torch.testing.assert_close(
        torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), atol=atol, rtol=0
    )


# ----------------------------------------------------------------------------------------------- the split rule


def trl_prepared(rows, tokenizer, model, tmp_path):
    trainer = DPOTrainer(
        copy.deepcopy(model),
        ref_model=copy.deepcopy(model),
        args=DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, max_length=None, disable_tqdm=True),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    return trainer.train_dataset


@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_split_equals_trl_dpo_preparation(kind, pc_rows, tiny_tokenizer, tiny_model_factory, tmp_path):
    rows = plain_pairs(pc_rows) if kind == "plain" else chat_pairs()
    prepared = trl_prepared(rows, tiny_tokenizer, tiny_model_factory(0), tmp_path)
    assert len(prepared) == len(rows)
    for i, row in enumerate(rows):
        ours = split_preference_row(row, tiny_tokenizer)
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert ours[column] == list(prepared[i][column]), (i, column)
    if kind == "plain":
        assert len(rows) >= 20
        eos = tiny_tokenizer.eos_token_id
        assert all(split_preference_row(r, tiny_tokenizer)["rejected_ids"][-1] == eos for r in rows)
        # The merge row: the prompt alone ends with a token that prompt+completion does not have; TRL cuts it off,
        # so both completions start with what used to be the prompt's end ("river" -> "riverside", " river").
        full_prompt = tiny_tokenizer(MERGE["prompt"])["input_ids"]
        split = split_preference_row(MERGE, tiny_tokenizer)
        assert len(split["prompt_ids"]) == len(full_prompt) - 1 == len(prepared[len(pc_rows)]["prompt_ids"])
        assert tiny_tokenizer.decode(split["chosen_ids"][:1]) == "riverside"
        assert tiny_tokenizer.decode(split["rejected_ids"]).startswith("river")


def test_split_implicit_prompt(tiny_tokenizer):
    row = {"chosen": "<s>name[Aromi]<sep> Aromi.", "rejected": "<s>name[Aromi]<sep> Zizzi."}
    ours = split_preference_row(row, tiny_tokenizer)
    explicit = split_preference_row(
        {"prompt": "<s>name[Aromi]<sep> ", "chosen": "Aromi.", "rejected": "Zizzi."}, tiny_tokenizer
    )
    assert tiny_tokenizer.decode(ours["prompt_ids"] + ours["chosen_ids"]) == row["chosen"] + "</s>"
    assert ours["prompt_ids"] + ours["rejected_ids"] == explicit["prompt_ids"] + explicit["rejected_ids"]


# ------------------------------------------------------------------------------------------------------------ P7


@pytest.mark.parametrize("ce_beta", [1.0, 0.5])
def test_p7_equals_naive_full_softmax(ce_beta, pc_rows, tiny_tokenizer, models):
    pos, neg = models
    rows = plain_pairs(pc_rows) + chat_pairs()
    out = score_contrastive(rows, pos, neg, tiny_tokenizer, ce_beta=ce_beta, score_chosen=True, batch_size=4)
    assert out["kept_rows"] == list(range(len(rows)))
    eos = tiny_tokenizer.eos_token_id
    spread = []
    for i, row in enumerate(rows):
        split = split_preference_row(row, tiny_tokenizer)
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert out[column][i] == split[column]
        plain = isinstance(row["prompt"], str)
        for side in ("rejected", "chosen"):
            ids, weights = split[f"{side}_ids"], out[f"{side}_weights"][i]
            assert len(weights) == len(ids)
            s = naive_scores(pos, neg, split["prompt_ids"], ids, ce_beta)
            expected = [1.0 - v for v in s] if side == "rejected" else s
            if plain:  # the EOS TRL appends: exactly 1.0 on both sides
                assert ids[-1] == eos and weights[-1] == 1.0
                weights, expected = weights[:-1], expected[:-1]
            else:  # chat rows end with the template's "</s>", scored like any token
                assert ids[-1] == eos and 0.0 < weights[-1] < 1.0
            if len(split["prompt_ids"]) == 0:
                weights, expected = weights[1:], expected[1:]
            close(weights, expected)
            spread += expected
    assert max(spread) - min(spread) > 0.5  # the comparison is not between near-constant values


def test_p7_b0_is_positive_model_probability(pc_rows, tiny_tokenizer, models):
    pos, neg = models
    row = plain_pairs(pc_rows)[0]
    out = score_contrastive([row], pos, neg, tiny_tokenizer, ce_beta=0.0)
    split = split_preference_row(row, tiny_tokenizer)
    ids = torch.tensor([split["prompt_ids"] + split["rejected_ids"]])
    with torch.no_grad():
        p_pos = pos(input_ids=ids).logits[0].double().softmax(-1)  # (T, V)
    n = len(split["prompt_ids"])
    expected = [1.0 - p_pos[n + k - 1, t].item() for k, t in enumerate(split["rejected_ids"])]
    close(out["rejected_weights"][0][:-1], expected[:-1])


def test_p7_chunk_sizes_agree(pc_rows, tiny_tokenizer, models):
    pos, neg = models
    rows = plain_pairs(pc_rows)
    base = score_contrastive(rows, pos, neg, tiny_tokenizer, score_chosen=True, chunk_size=100_000)  # >= every P
    for chunk_size in (1, 3):
        out = score_contrastive(rows, pos, neg, tiny_tokenizer, score_chosen=True, chunk_size=chunk_size)
        for side in ("rejected_weights", "chosen_weights"):
            for a, b in zip(out[side], base[side]):
                close(a, b, atol=1e-6)


def test_p7_batching_padding_and_order_change_nothing(pc_rows, tiny_tokenizer, models):
    pos, neg = models
    rows = plain_pairs(pc_rows) + chat_pairs()
    base = score_contrastive(rows, pos, neg, tiny_tokenizer, score_chosen=True, batch_size=1)  # no padding at all
    for batch_size in (3, 64):  # 64: one batch, every sequence padded to the longest
        out = score_contrastive(rows, pos, neg, tiny_tokenizer, score_chosen=True, batch_size=batch_size)
        for side in ("rejected_weights", "chosen_weights"):
            for a, b in zip(out[side], base[side]):
                close(a, b, atol=1e-6)
    # Rows come back in input order whatever order they go in: a permutation of the rows permutes the results.
    perm = list(torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)))
    out = score_contrastive([rows[p] for p in perm], pos, neg, tiny_tokenizer, batch_size=5)
    assert "chosen_weights" not in out
    for i, p in enumerate(perm):
        assert out["rejected_ids"][i] == base["rejected_ids"][p]
        close(out["rejected_weights"][i], base["rejected_weights"][p], atol=1e-6)


def test_accepts_a_dataset_and_keeps_weights_in_unit_range(pc_rows, tiny_tokenizer, models):
    pos, neg = models
    out = score_contrastive(Dataset.from_list(plain_pairs(pc_rows)), pos, neg, tiny_tokenizer)
    flat = [w for row in out["rejected_weights"] for w in row]
    assert all(0.0 <= w <= 1.0 for w in flat)
    assert all(w == torch.tensor(w, dtype=torch.float32).item() for w in flat)  # float32 values


def test_padded_vocab_is_part_of_the_softmax(pc_rows, tiny_tokenizer, tiny_model_factory):
    # Logit width 320 > 300 tokens (as Qwen's padded vocab): the extra logits are in the denominator, as in the code.
    pos, neg = (sharp_model(tiny_model_factory, s) for s in (0, 1))
    for m in (pos, neg):
        m.resize_token_embeddings(320, mean_resizing=False)
        with torch.no_grad():
            m.get_input_embeddings().weight[300:].normal_(0, 8.0)
    row = plain_pairs(pc_rows)[1]
    out = score_contrastive([row], pos, neg, tiny_tokenizer)
    split = split_preference_row(row, tiny_tokenizer)
    expected = [1.0 - v for v in naive_scores(pos, neg, split["prompt_ids"], split["rejected_ids"], 1.0)]
    close(out["rejected_weights"][0][:-1], expected[:-1])


def test_peft_adapters_are_active(pc_rows, tiny_tokenizer, tiny_model_factory):
    # A LoRA positive model (the recipe's pos/ adapter): the backbone path must run the adapter, as its forward does.
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    pos = get_peft_model(sharp_model(tiny_model_factory, 0), config).eval()
    neg = sharp_model(tiny_model_factory, 1)
    row = plain_pairs(pc_rows)[2]
    out = score_contrastive([row], pos, neg, tiny_tokenizer)
    split = split_preference_row(row, tiny_tokenizer)
    expected = [1.0 - v for v in naive_scores(pos, neg, split["prompt_ids"], split["rejected_ids"], 1.0)]
    close(out["rejected_weights"][0][:-1], expected[:-1])
    with pos.disable_adapter():
        without = [1.0 - v for v in naive_scores(pos, neg, split["prompt_ids"], split["rejected_ids"], 1.0)]
    assert max(abs(a - b) for a, b in zip(without[:-1], expected[:-1])) > 1e-2  # the adapter matters


# ------------------------------------------------------------------------------------------------- length filter


def test_length_filter_drops_rows_and_says_which_were_kept(pc_rows, tiny_tokenizer, models, capsys):
    pos, neg = models
    rows = plain_pairs(pc_rows)
    splits = [split_preference_row(r, tiny_tokenizer) for r in rows]
    prompt_len = [len(s["prompt_ids"]) for s in splits]
    full_len = [len(s["prompt_ids"]) + max(len(s["chosen_ids"]), len(s["rejected_ids"])) for s in splits]
    max_prompt, max_len = sorted(prompt_len)[-3], sorted(full_len)[-4]
    kept = [i for i in range(len(rows)) if prompt_len[i] < max_prompt and full_len[i] < max_len]
    assert 0 < len(kept) < len(rows) - 3
    out = score_contrastive(rows, pos, neg, tiny_tokenizer, max_prompt_length=max_prompt, max_length=max_len)
    assert out["kept_rows"] == kept
    assert all(len(out[c]) == len(kept) for c in ("prompt_ids", "chosen_ids", "rejected_ids", "rejected_weights"))
    full = score_contrastive(rows, pos, neg, tiny_tokenizer, max_prompt_length=None, max_length=None)
    for j, i in enumerate(kept):
        assert out["rejected_ids"][j] == full["rejected_ids"][i]
        close(out["rejected_weights"][j], full["rejected_weights"][i], atol=1e-6)
    printed = capsys.readouterr().out
    assert f"{len(kept)} of {len(rows)} pairs kept, {len(rows) - len(kept)} dropped" in printed


def test_row_longer_than_the_models_is_refused(pc_rows, tiny_tokenizer, tiny_model_factory):
    pos, neg = tiny_model_factory(0), tiny_model_factory(1)
    rows = plain_pairs(pc_rows)[:3]
    longest = max(
        len(s["prompt_ids"]) + len(s["rejected_ids"])
        for s in map(lambda r: split_preference_row(r, tiny_tokenizer), rows)
    )
    neg.config.max_position_embeddings = longest - 1
    with pytest.raises(ValueError, match=rf"has {longest} tokens \(prompt \+ rejected\) but the models read at most"):
        score_contrastive(rows, pos, neg, tiny_tokenizer)


# ---------------------------------------------------------------------------------------------------- errors (§9)


def test_same_model_twice_is_refused(pc_rows, tiny_tokenizer, tiny_model_factory):
    model = tiny_model_factory(0)
    with pytest.raises(ValueError, match="pos_model and neg_model are the same model"):
        score_contrastive(plain_pairs(pc_rows), model, model, tiny_tokenizer)


def test_logit_width_mismatch_is_refused(pc_rows, tiny_tokenizer, tiny_model_factory):
    pos, neg = tiny_model_factory(0), tiny_model_factory(1)
    neg.resize_token_embeddings(304, mean_resizing=False)
    with pytest.raises(ValueError, match="pos_model has 300 logits per position but neg_model has 304"):
        score_contrastive(plain_pairs(pc_rows), pos, neg, tiny_tokenizer)
    pos.resize_token_embeddings(256, mean_resizing=False)
    neg.resize_token_embeddings(256, mean_resizing=False)
    with pytest.raises(ValueError, match="the tokenizer has 300 tokens but the models produce only 256 logits"):
        score_contrastive(plain_pairs(pc_rows), pos, neg, tiny_tokenizer)


def test_equal_chosen_and_rejected_names_the_row(pc_rows, tiny_tokenizer, tiny_model_factory):
    rows = plain_pairs(pc_rows)[:4]
    rows[2] = {**rows[2], "rejected": rows[2]["chosen"]}
    with pytest.raises(ValueError, match="^row 2: chosen and rejected are the same text"):
        score_contrastive(rows, tiny_model_factory(0), tiny_model_factory(1), tiny_tokenizer)


def _msg(role, content):
    return {"role": role, "content": content}


def test_pairs_with_different_prompts_name_the_row(tiny_tokenizer, tiny_model_factory):
    """Implicit chat prompts whose user turns differ: TRL would take the common messages as the prompt and train on
    each side's own question; here the row is refused."""
    system = _msg("system", "Be brief.")
    good = {
        "chosen": [system, _msg("user", "Area?"), _msg("assistant", "riverside")],
        "rejected": [system, _msg("user", "Area?"), _msg("assistant", "city centre")],
    }
    bad = {
        "chosen": [system, _msg("user", "Area?"), _msg("assistant", "riverside")],
        "rejected": [system, _msg("user", "Food?"), _msg("assistant", "Italian")],
    }
    with pytest.raises(ValueError, match=r"^row 1: chosen and rejected differ from message 1 on.*'user' message"):
        score_contrastive([good, bad], tiny_model_factory(0), tiny_model_factory(1), tiny_tokenizer)


def test_completion_repeating_the_prompt_names_the_row():
    prompt = [_msg("user", "Area?")]
    check_pair_prompt({"prompt": prompt, "chosen": [_msg("assistant", "a")], "rejected": [_msg("assistant", "b")]}, 0)
    row = {"prompt": prompt, "chosen": [_msg("assistant", "a")], "rejected": [*prompt, _msg("assistant", "b")]}
    with pytest.raises(ValueError, match="^row 7: rejected starts with a 'user' message"):
        check_pair_prompt(row, 7)
    check_pair_prompt({"prompt": "Q: 1+1\nA:", "chosen": " 2", "rejected": " 3"}, 0)  # text rows: nothing to check


@pytest.mark.parametrize("kwargs", [{"ce_beta": -0.1}, {"chunk_size": 0}, {"batch_size": 0}])
def test_bad_arguments(kwargs, pc_rows, tiny_tokenizer, tiny_model_factory):
    with pytest.raises(ValueError, match="ce_beta|chunk_size"):
        score_contrastive(plain_pairs(pc_rows), tiny_model_factory(0), tiny_model_factory(1), tiny_tokenizer, **kwargs)


# ------------------------------------------------------------------------------------------------ two processes

WORKER = """
import json, sys
from accelerate import Accelerator
from transformers import AutoTokenizer, LlamaForCausalLM
from tokentrain.runtime import exit_process
from tokentrain.signals.contrastive import score_contrastive

folder = sys.argv[1]
accelerator = Accelerator()
assert accelerator.num_processes == 2
rows = json.loads(open(f"{folder}/rows.json").read())
out = score_contrastive(
    rows,
    LlamaForCausalLM.from_pretrained(f"{folder}/pos"),
    LlamaForCausalLM.from_pretrained(f"{folder}/neg"),
    AutoTokenizer.from_pretrained(f"{folder}/pos"),
    score_chosen=True,
    batch_size=3,
    accelerator=accelerator,
)
with open(f"{folder}/rank{accelerator.process_index}.json", "w") as f:
    json.dump(out, f)
exit_process(0)  # a gloo rank can abort at interpreter exit after its work is done: see its docstring
"""


@pytest.mark.slow
def test_two_processes_equal_one(pc_rows, tiny_tokenizer, models, tmp_path):
    # Sequences strided over 2 gloo processes on CPU, gathered: both ranks return every row, in input order.
    config = Path(__file__).resolve().parents[1] / "accelerate_configs" / "cpu.yaml"
    if not config.exists():
        pytest.skip(f"{config} is absent")
    pos, neg = models
    rows = plain_pairs(pc_rows) + chat_pairs()
    pos.save_pretrained(tmp_path / "pos")
    tiny_tokenizer.save_pretrained(tmp_path / "pos")
    neg.save_pretrained(tmp_path / "neg")
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "worker.py").write_text(WORKER)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    environ.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    proc = subprocess.run(
        [*cmd, str(tmp_path / "worker.py"), str(tmp_path)], env=environ, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = score_contrastive(rows, pos, neg, tiny_tokenizer, score_chosen=True, batch_size=3)
    for rank in (0, 1):
        two = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert two.keys() == one.keys()
        for column in ("kept_rows", "prompt_ids", "chosen_ids", "rejected_ids"):
            assert two[column] == one[column]
        for column in ("rejected_weights", "chosen_weights"):
            for a, b in zip(two[column], one[column]):
                close(a, b, atol=1e-6)
