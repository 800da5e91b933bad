"""The aligndistil pipeline's stages through the CLI, on the keyword_length task made in code (spec aligndistil sections
4, 7, 8 and 9): prepare (data, tokenizer, 90,944-parameter model), the DPO and reverse-DPO stages (explicit reference,
swapped sides), the aligndistil training stage (resume after a kill, the reward curve leaves training unchanged),
the aligndistil_alpha score stage (columns, meta, heat map), the keyword_length and generations evaluations (reward,
win rate, KL against a naive full-logits reference), the chat_preferences preparation, the mini report (table, plot)
and every bad input the stages name. The quickstart and the mini recipe run end to end in the slow tests."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk

from tokentrain.cli import main
from tokentrain.models import load_model, load_tokenizer, sample, sampling_kwargs
from tokentrain.reports.aligndistil import aligndistil_mini
from tokentrain.signals.aligndistil_alpha import sequence_kl
from tokentrain.tasks import keyword_length as kl

ROOT = Path(__file__).resolve().parents[1]
COMMON = "per_device_train_batch_size: 8\nlr_scheduler_type: constant\nweight_decay: 0.0\nmax_length: 32\nbf16: false\n"
COMMON += "gradient_checkpointing: false\nlogging_steps: 1\nreport_to: none\n"


def write_stage(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A prepared keyword_length folder (64 SFT rows, 48 pairs, 16 held-out prompts) and the DPO and reverse-DPO
    stages (2 steps at lr 1e-2 from the untrained init, which serves as the SFT model), all through the CLI."""
    root = tmp_path_factory.mktemp("aligndistil")
    torch.set_num_threads(1)
    prepare = "stage: prepare\ntask: keyword_length\nseed: 3\nsft_rows: 64\npref_rows: 48\nheldout_rows: 16\n"
    assert main(["prepare", str(write_stage(root / "00_prepare.yaml", prepare + f"output_dir: {root}/data\n"))]) == 0
    for name, swap in (("dpo", False), ("reverse_dpo", True)):
        text = (
            f"stage: train\nobjective: dpo\nmodel: {root}/data/init\nref_model: {root}/data/init\n"
            f"dataset: {root}/data/prefs.jsonl\noutput_dir: {root}/{name}\nswap_chosen_rejected: {str(swap).lower()}\n"
            f"beta: 0.1\nmax_steps: 2\nlearning_rate: 1.0e-2\nseed: 0\n" + COMMON
        )
        assert main(["train", str(write_stage(root / f"{name}.yaml", text))]) == 0
    return root


# --------------------------------------------------------------------------------------------------- the task


def test_reward_hand_computed():
    # 1[K ∈ y] − 0.1·|n − 4|
    assert kl.reward("the tiger big old".split(), "tiger") == pytest.approx(1.0)
    assert kl.reward(["the"] * 6, "tiger") == pytest.approx(-0.2)
    assert kl.reward(["tiger"], "tiger") == pytest.approx(0.7)
    assert kl.reward([], "tiger") == pytest.approx(-0.4)
    tok = kl.make_tokenizer()
    eos = tok.eos_token_id
    ids = tok.convert_tokens_to_ids("the tiger big".split())
    scored = kl.score_samples([ids + [eos, 7, 7], ids * 5], ["tiger", "lemon"], tok)  # words after <eos> do not count
    assert scored["reward"] == pytest.approx([0.9, -1.1]) and scored["length"] == [3, 15]
    assert scored["keyword"] == [True, False] and scored["ended"] == [True, False]
    assert kl.win_rate([1.0, 0.5, 0.2], [0.5, 0.5, 0.9]) == pytest.approx((1 + 0.5 + 0) / 3)


def test_prepare_writes_the_spec_task(run):
    data = run / "data"
    sft, prefs, held = (read_jsonl(data / f"{n}.jsonl") for n in ("sft", "prefs", "heldout"))
    assert (len(sft), len(prefs), len(held)) == (64, 48, 16)
    tok = load_tokenizer(str(data / "init"))
    assert len(tok) == len(kl.VOCAB) == 68 and len(kl.KEYWORDS) == 16 and len(kl.FILLERS) == 46
    assert tok.convert_ids_to_tokens(tok(held[0]["prompt"])["input_ids"])[:2] == ["<bos>", "about"]
    model = load_model(str(data / "init"), trainable=False)
    assert sum(p.numel() for p in model.parameters()) == 90_944  # spec section 7
    assert not model.config.tie_word_embeddings and model.config.num_hidden_layers == 2

    def triple(row):
        words = row["prompt"].split()
        return words[1], words[3], words[4]

    assert not {triple(r) for r in held} & {triple(r) for r in sft + prefs}  # held-out triples are unseen
    for r in sft + prefs + held:
        assert r["prompt"] == kl.prompt_text(*triple(r)) and r["keyword"] == triple(r)[0]
    for r in sft:
        assert 1 <= len(r["completion"].split()) <= 10
    summary = json.loads((data / "data_summary.json").read_text())
    assert summary["prefs_chosen_reward"] > summary["prefs_rejected_reward"]  # Bradley-Terry labels
    assert kl.make_data(3, 64, 48, 16) == {"sft": sft, "prefs": prefs, "heldout": held}  # the seed drives the data


def test_alpha_by_kind_hand_computed():
    tok = kl.make_tokenizer()
    ids = tok.convert_tokens_to_ids(["tiger", "the", "<eos>"])
    out = kl.alpha_by_kind([ids, ids[1:]], [[3.0, 1.0, 0.5], [2.0, 1.5]], ["tiger", "lemon"], tok)
    assert out["keyword"] == {"alpha_mean": 3.0, "positions": 1}
    assert out["eos"] == {"alpha_mean": 1.0, "positions": 2}  # (0.5 + 1.5) / 2
    assert out["other"] == {"alpha_mean": 1.5, "positions": 2}  # (1.0 + 2.0) / 2
    with pytest.raises(ValueError, match="2 completion ids but 3"):
        kl.alpha_by_kind([ids[1:]], [[1.0, 2.0, 3.0]], ["tiger"], tok)


# ------------------------------------------------------------------------------------------- sampling helpers


def test_sampling_is_explicit_seeded_and_leaves_the_random_state(run, monkeypatch):
    tok = load_tokenizer(str(run / "data" / "init"))
    model = load_model(str(run / "data" / "init"), trainable=False)
    model.generation_config.top_k, model.generation_config.temperature = 5, 0.3  # a checkpoint's own defaults
    prompts = [tok(r["prompt"])["input_ids"] for r in read_jsonl(run / "data" / "heldout.jsonl")]
    seen = []
    real = model.generate

    def spy(**kwargs):
        seen.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = sample(model, tok, prompts, 14, batch_size=5, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is untouched
    assert a == sample(model, tok, prompts, 14, batch_size=5, seed=7) != sample(model, tok, prompts, 14, 5, seed=8)
    assert all(k["top_k"] == 0 and k["temperature"] == 1.0 and k["top_p"] == 1.0 and k["do_sample"] for k in seen)
    assert all(k["repetition_penalty"] == 1.0 and k["max_new_tokens"] == 14 for k in seen)
    eos = tok.eos_token_id
    assert all(eos not in s[:-1] for s in a)  # cut after the first EOS
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        sampling_kwargs(tok, 0)


def test_sequence_kl_equals_naive_full_logits(run):
    tok = load_tokenizer(str(run / "data" / "init"))
    a = load_model(str(run / "dpo"), trainable=False)
    b = load_model(str(run / "reverse_dpo"), trainable=False)
    rows = read_jsonl(run / "data" / "heldout.jsonl")[:5]
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    responses = [tok(r["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in rows]
    responses[2] = []  # no token: KL 0
    got = sequence_kl(a, b, prompts, responses, tok.pad_token_id, batch_size=2, chunk_tokens=3)
    for p, r, value in zip(prompts, responses, got):
        if not r:
            assert value == 0.0
            continue
        ids = torch.tensor([p + r])
        with torch.no_grad():
            la = torch.log_softmax(a(ids).logits[0, len(p) - 1 : -1].double(), -1)  # (T, V) predicting r
            lb = torch.log_softmax(b(ids).logits[0, len(p) - 1 : -1].double(), -1)
        naive = float((la.exp() * (la - lb)).sum())
        assert value == pytest.approx(naive, rel=1e-5, abs=1e-6) and value > 0
    with pytest.raises(ValueError, match=r"rows \[0\] have an empty prompt"):
        sequence_kl(a, b, [[]], [[1]], 0)


# ------------------------------------------------------------------------------------ DPO and reverse-DPO stages


def implicit_margins(policy_dir, ref_dir, rows, tok) -> list[float]:
    """β-free DPO implicit reward margins: [log π(c) − log π_ref(c)] − [log π(r) − log π_ref(r)] per row."""
    policy, ref = (load_model(str(d), trainable=False) for d in (policy_dir, ref_dir))

    def logp(model, prompt, completion):
        p = tok(prompt)["input_ids"]
        ids = tok(prompt + completion + tok.eos_token)["input_ids"]
        with torch.no_grad():
            logps = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
        return float(sum(logps[t, ids[t + 1]] for t in range(len(p) - 1, len(ids) - 1)))

    return [
        (logp(policy, r["prompt"], r["chosen"]) - logp(ref, r["prompt"], r["chosen"]))
        - (logp(policy, r["prompt"], r["rejected"]) - logp(ref, r["prompt"], r["rejected"]))
        for r in rows
    ]


def test_dpo_and_reverse_dpo_stages_train_opposite_preferences(run):
    tok = load_tokenizer(str(run / "data" / "init"))
    rows = read_jsonl(run / "data" / "prefs.jsonl")[:16]
    forward = implicit_margins(run / "dpo", run / "data" / "init", rows, tok)
    reverse = implicit_margins(run / "reverse_dpo", run / "data" / "init", rows, tok)
    assert statistics.mean(forward) > 0 > statistics.mean(reverse)  # the reverse model prefers the rejected sides
    record = json.loads((run / "reverse_dpo" / "stage.json").read_text())
    assert record["config"]["swap_chosen_rejected"] is True and record["config"]["ref_model"].endswith("init")


# ------------------------------------------------------------------------------------ the aligndistil stage


def aligndistil_stage(run: Path, out: Path, extra: str = "") -> Path:
    text = (
        f"stage: train\nobjective: aligndistil\nmodel: {run}/data/init\ndataset: {run}/data/prefs.jsonl\n"
        f"dpo_model: {run}/dpo\nreverse_model: {run}/reverse_dpo\nr: 5.0\nbeta0: 0.1\noutput_dir: {out}\nseed: 0\n"
        "max_steps: 4\nsave_steps: 2\nlearning_rate: 1.0e-2\n" + COMMON + extra
    )
    return write_stage(out.parent / f"{out.name}.yaml", text)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_model(str(folder), trainable=False).state_dict().items()}


def test_aligndistil_stage_resumes_after_a_kill_and_the_curve_changes_nothing(run, tmp_path, monkeypatch, capsys):
    from tokentrain.trainers.aligndistil import AlignDistilTrainer

    curve = f"reward_curve_dataset: {run}/data/heldout.jsonl\nreward_curve_every: 2\n"
    assert main(["train", str(aligndistil_stage(run, tmp_path / "plain"))]) == 0
    assert main(["train", str(aligndistil_stage(run, tmp_path / "whole", curve))]) == 0
    whole = weights(tmp_path / "whole")
    assert all(
        torch.equal(whole[k], v) for k, v in weights(tmp_path / "plain").items()
    )  # sampling the curve: no effect

    real, calls = AlignDistilTrainer.compute_loss, []

    def killed_at_step_3(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after checkpoint-2 was written
            raise RuntimeError("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AlignDistilTrainer, "compute_loss", killed_at_step_3)
    stage = aligndistil_stage(run, tmp_path / "resumed", curve)
    with pytest.raises(RuntimeError, match="killed"):
        main(["train", str(stage)])
    assert (tmp_path / "resumed.tmp" / "checkpoint-2" / "trainer_state.json").exists()
    monkeypatch.setattr(AlignDistilTrainer, "compute_loss", real)
    capsys.readouterr()
    assert main(["train", str(stage)]) == 0
    for k, v in weights(tmp_path / "resumed").items():
        torch.testing.assert_close(v, whole[k], rtol=1e-5, atol=1e-6)
    summaries = [json.loads((tmp_path / n / "train_summary.json").read_text()) for n in ("whole", "resumed")]
    curves = [kl.reward_curve(s["log_history"]) for s in summaries]
    assert [c["step"] for c in curves[1]] == [0, 2, 4]  # the checks before the kill survive the resume
    assert curves[0][:2] == curves[1][:2] and curves[0][2]["reward"] == pytest.approx(curves[1][2]["reward"], abs=0.1)
    alphas = [e["aligndistil/alpha_mean"] for e in summaries[1]["log_history"] if "aligndistil/alpha_mean" in e]
    assert alphas and all(0.001 <= a <= 5.001 for a in alphas)


def test_aligndistil_stage_bad_keys_name_them(run, tmp_path, capsys):
    for extra, message in (
        ("alpha: adaptive\nratio: 2.0\n", "ratio has no effect with alpha 'adaptive'"),
        ("reference_model: x\n", "reference_model has no effect with teacher 'contrastive'"),
        ("on_policy: false\nmax_new_tokens: 14\n", "max_new_tokens has no effect off-policy"),
    ):
        path = aligndistil_stage(run, tmp_path / f"bad{len(extra)}", extra)
        assert main(["train", str(path)]) == 2
        assert message in capsys.readouterr().err
    path = aligndistil_stage(run, tmp_path / "bad", "").read_text().replace(f"reverse_model: {run}/reverse_dpo\n", "")
    assert main(["train", str(write_stage(tmp_path / "bad.yaml", path))]) == 2
    assert "reverse_model is required with teacher 'contrastive'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the score stage

SCORE = "stage: score\nsignal: aligndistil_alpha\ndataset: {run}/data/heldout.jsonl\noutput_dir: {out}\nbatch_size: 4\n"


def test_score_stage_writes_columns_meta_and_heat_map(run, tmp_path, capsys):
    text = SCORE.format(run=run, out=tmp_path / "alpha")
    text += (
        f"dpo_model: {run}/dpo\nreverse_model: {run}/reverse_dpo\nr: 5.0\neps: 0.002\nchunk_tokens: 7\nhtml_rows: 4\n"
    )
    assert main(["score", str(write_stage(tmp_path / "score.yaml", text))]) == 0
    scored = load_from_disk(str(tmp_path / "alpha"))
    held = read_jsonl(run / "data" / "heldout.jsonl")
    tok = load_tokenizer(str(run / "data" / "init"))
    assert scored["prompt"] == [r["prompt"] for r in held] and "keyword" in scored.column_names
    for row in scored:
        assert row["completion_ids"] == tok(row["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert len(row["aligndistil_alpha"]) == len(row["aligndistil_distance"]) == len(row["completion_ids"])
        for a, d in zip(row["aligndistil_alpha"], row["aligndistil_distance"]):
            assert 0 <= d <= 1 and a == pytest.approx(5.0 * d + 0.002, rel=1e-5)
    meta = json.loads((tmp_path / "alpha" / "signal_meta.json").read_text())
    assert meta["signal"] == "aligndistil_alpha" and Path(meta["tokenizer"]).is_absolute()
    assert meta["settings"]["r"] == 5.0 and meta["settings"]["eps"] == 0.002 and meta["rows"] == 16
    page = (tmp_path / "alpha" / "aligndistil_alpha.html").read_text()
    assert "aligndistil_alpha" in page and page.count('class="t') >= 4
    out = tmp_path / "inspect.html"
    argv = ["inspect", str(tmp_path / "alpha"), "--column", "aligndistil_alpha", "--ids_column", "completion_ids"]
    assert main([*argv, "--out", str(out)]) == 0 and out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        ("dpo_model: {run}/dpo\nreverse_model: {run}/reverse_dpo\nratio: 2.0\n", "ratio has no effect"),
        ("dpo_model: {run}/dpo\nreverse_model: {run}/reverse_dpo\nalpha: constant\nr: 5\n", "r has no effect"),
        ("dpo_model: {run}/dpo\nreverse_model: {run}/reverse_dpo\nreference_model: x\n", "reference_model has no"),
        ("dpo_model: {run}/dpo\n", "needs reverse_model"),
        ("dpo_model: {run}/dpo\nteacher: dpo_ref\nalpha: constant\n", "needs reference_model"),
        ("dpo_model: {run}/dpo\nreverse_model: {run}/reverse_dpo\nr: -1\n", "r must be finite and > 0"),
        ("dpo_model: {run}/dpo\nreverse_model: {run}/reverse_dpo\ndistance: l2\n", "distance must be one of"),
    ],
)
def test_score_stage_bad_keys_name_them(run, tmp_path, capsys, extra, message):
    text = SCORE.format(run=run, out=tmp_path / "alpha") + extra.format(run=run)
    assert main(["score", str(write_stage(tmp_path / "score.yaml", text))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "alpha").exists()


# --------------------------------------------------------------------------------------- the evaluate stage

EVALUATE = (
    "stage: evaluate\ntask: keyword_length\ndataset: {run}/data/heldout.jsonl\nkl_model: {run}/dpo\nbatch_size: 6\n"
    "seed: 1\noutput_dir: {out}\nmodels:\n  sft: {run}/data/init\n  dpo: {run}/dpo\n"
)


def test_evaluate_keyword_length(run, tmp_path, capsys):
    score = SCORE.format(run=run, out=tmp_path / "alpha") + f"dpo_model: {run}/dpo\nreverse_model: {run}/reverse_dpo\n"
    assert main(["score", str(write_stage(tmp_path / "score.yaml", score))]) == 0
    text = EVALUATE.format(run=run, out=tmp_path / "eval") + f"baseline: dpo\nalpha_scores: {tmp_path}/alpha\n"
    text += "chunk_tokens: 5\n"  # the KL projected 5 positions at a time
    assert main(["evaluate", str(write_stage(tmp_path / "eval.yaml", text))]) == 0
    assert "| sft |" in capsys.readouterr().out
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    models = result["models"]
    assert models["dpo"]["win_rate"] == 0.5 and models["dpo"]["kl_to_kl_model"] == pytest.approx(0.0, abs=1e-6)
    assert models["sft"]["kl_to_kl_model"] > 0
    held = read_jsonl(run / "data" / "heldout.jsonl")
    rows = {n: read_jsonl(tmp_path / "eval" / f"generations_{n}.jsonl") for n in ("sft", "dpo")}
    for name, records in rows.items():
        assert [r["instruction"] for r in records] == [h["prompt"] for h in held]
        for r, h in zip(records, held):  # the reward recomputed from the decoded text
            words = r["output"].split()
            assert r["reward"] == pytest.approx(kl.reward(words, h["keyword"])) and r["length"] == len(words)
        assert models[name]["reward"] == pytest.approx(statistics.mean(r["reward"] for r in records))
        assert models[name]["keyword_rate"] == pytest.approx(statistics.mean(r["keyword"] for r in records))
    wins = [
        1.0 if a["reward"] > b["reward"] else 0.5 if a["reward"] == b["reward"] else 0.0 for a, b in zip(*rows.values())
    ]
    assert models["sft"]["win_rate"] == pytest.approx(statistics.mean(wins))
    kinds = result["alpha_by_kind"]
    assert kinds["eos"]["positions"] == 16 and sum(k["positions"] for k in kinds.values()) == sum(
        len(h["chosen"].split()) + 1 for h in held
    )
    assert "alpha_mean" not in models["dpo"]  # not an aligndistil run


@pytest.mark.parametrize(
    "extra, message",
    [
        ("baseline: sft2\n", "baseline 'sft2' is not one of the models"),
        ("kl_model: ''\n", "needs kl_model"),
        ("task: generations\nbaseline: dpo\n", "baseline has no effect with task 'generations'"),
        ("task: summarise\n", "task must be one of"),
        ("batch_size: 0\n", "batch_size and chunk_tokens >= 1"),
    ],
)
def test_evaluate_bad_keys_name_them(run, tmp_path, capsys, extra, message):
    keys = {line.split(":")[0] for line in extra.splitlines()}
    text = "".join(
        x + "\n" for x in EVALUATE.format(run=run, out=tmp_path / "eval").splitlines() if x.split(":")[0] not in keys
    )
    assert main(["evaluate", str(write_stage(tmp_path / "eval.yaml", text + extra))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_evaluate_rows_without_keyword_are_named(run, tmp_path, capsys):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "about tiger with red calm :"}) + "\n")
    text = EVALUATE.format(run=run, out=tmp_path / "eval").replace(
        f"{run}/data/heldout.jsonl", f"{tmp_path}/rows.jsonl"
    )
    assert main(["evaluate", str(write_stage(tmp_path / "eval.yaml", text))]) == 2
    assert "lacks column(s) ['keyword']" in capsys.readouterr().err


# ------------------------------------------------------------------------------- real-scale data and evaluation


def h4_rows() -> list[dict]:
    def conv(user, reply):
        return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]

    return [
        {"prompt": "hi", "chosen": conv("name[Aromi]", "Aromi is good."), "rejected": conv("name[Aromi]", "No.")},
        {"prompt": "x", "chosen": conv("name[Cotto]", "Cotto."), "rejected": conv("name[Zizzi]", "Zizzi.")},
        {"prompt": "y", "chosen": conv("q", "a")[:1], "rejected": conv("q", "b")[:1]},  # no reply
        {"prompt": "z", "chosen": conv("name[Mill]", "The Mill."), "rejected": conv("name[Mill]", "Mill?")},
    ]


def test_chat_preferences_and_generations(tmp_path, tiny_model_dir, capsys, one_thread):
    (tmp_path / "h4").mkdir()
    with open(tmp_path / "h4" / "train_prefs.jsonl", "w") as f:
        for row in h4_rows():
            f.write(json.dumps(row) + "\n")
    text = f"stage: prepare\ntask: chat_preferences\ndataset: {tmp_path}/h4\noutput_dir: {tmp_path}/data\n"
    text += "splits:\n  train: train_prefs\n"
    assert main(["prepare", str(write_stage(tmp_path / "p.yaml", text))]) == 0
    rows = read_jsonl(tmp_path / "data" / "train.jsonl")
    assert rows[0] == {
        "prompt": [{"role": "user", "content": "name[Aromi]"}],
        "chosen": [{"role": "assistant", "content": "Aromi is good."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    summary = json.loads((tmp_path / "data" / "prepare_summary.json").read_text())
    assert summary["train"] == {"split": "train_prefs", "rows": 2, "dropped": 2, "first_dropped": [1, 2]}
    text = (
        f"stage: evaluate\ntask: generations\ndataset: {tmp_path}/data/train.jsonl\nkl_model: {tiny_model_dir}\n"
        f"models:\n  a: {tiny_model_dir}\nmax_new_tokens: 5\noutput_dir: {tmp_path}/eval\n"
    )
    assert main(["evaluate", str(write_stage(tmp_path / "e.yaml", text))]) == 0
    records = read_jsonl(tmp_path / "eval" / "generations_a.jsonl")
    assert [r["instruction"] for r in records] == ["name[Aromi]", "name[Mill]"] and records[0]["generator"] == "a"
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())["models"]["a"]
    assert result["kl_to_kl_model"] == pytest.approx(0.0, abs=1e-6) and 0 <= result["length"] <= 5
    assert "reward" not in result and "win_rate" not in result
    bad = text.replace("task: generations", "task: generations\nalpha_scores: x").replace("/eval\n", "/eval2\n")
    assert main(["evaluate", str(write_stage(tmp_path / "e2.yaml", bad))]) == 2
    assert "alpha_scores has no effect with task 'generations'" in capsys.readouterr().err
    nocol = f"stage: prepare\ntask: chat_preferences\ndataset: {tmp_path}/data/rows.jsonl\noutput_dir: {tmp_path}/d2\n"
    (tmp_path / "data" / "rows.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    assert main(["prepare", str(write_stage(tmp_path / "p2.yaml", nocol + "splits:\n  train: train\n"))]) == 2
    assert "lacks column(s) ['rejected']" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the report


def fake_eval(seed: int) -> dict:
    models = {}
    for k, name in enumerate(("sft", "dpo", "dpo_lr3e-4", "adaptive_r5")):
        curve = [
            {"step": s, "reward": 0.1 * k + 0.01 * s + 0.001 * seed, "keyword_rate": 0.5, "length": 4}
            for s in (0, 10, 20, 30, 40, 50, 60)
        ]
        models[name] = {
            "reward": 0.2 * k + 0.01 * seed,
            "keyword_rate": 0.5,
            "length": 4.0 + seed,
            "win_rate": 0.5,
            "kl_to_kl_model": 0.1 * k,
            "truncated_frac": 0.0,
            **({"reward_curve": curve} if name != "sft" else {}),
            **({"alpha_mean": 0.9 + 0.1 * seed} if name == "adaptive_r5" else {}),
        }
    kinds = {"keyword": {"alpha_mean": 1.0 + seed, "positions": 5}, "eos": {"alpha_mean": 0.5, "positions": 3}}
    return {"models": models, "alpha_by_kind": kinds, "task": "keyword_length"}


def test_mini_report_table_and_plot(tmp_path):
    for seed in range(3):
        (tmp_path / f"seed{seed}" / "eval").mkdir(parents=True)
        (tmp_path / f"seed{seed}" / "eval" / "eval.json").write_text(json.dumps(fake_eval(seed)))
    (tmp_path / "plot").mkdir()
    results, table = aligndistil_mini(tmp_path, {}, out_dir=tmp_path / "plot")
    rows = results["rows"]
    assert list(rows) == ["sft", "dpo", "dpo_lr3e-4", "adaptive_r5"]  # the spec's order
    assert rows["dpo"]["reward"]["mean"] == pytest.approx(0.21) and rows["dpo"]["reward"]["sd"] == pytest.approx(0.01)
    assert rows["adaptive_r5"]["alpha_mean"]["mean"] == pytest.approx(1.0) and rows["dpo"]["alpha_mean"] is None
    curve = rows["dpo"]["curve"]
    assert curve["steps"] == [0, 10, 20, 30, 40, 50, 60] and curve["at"]["20"]["mean"] == pytest.approx(0.301)
    assert curve["curve_mean"]["mean"] == pytest.approx(0.1 + 0.35 + 0.001)  # steps 10-60 only
    assert rows["sft"]["curve"] is None
    assert "| (3) DPO at the student's lr 3e-4 (control) | 0.410 ± 0.010 |" in table
    assert "| 2.000 ± 1.000 | 0.500 ± 0.000 |" in table  # α by kind: keyword 1, 2, 3; eos 0.5
    paired = results["vs_control"]["adaptive_r5"]  # minus dpo_lr3e-4, seed by seed
    assert paired["reward"]["mean"] == pytest.approx(0.2) and paired["reward"]["sd"] == pytest.approx(0.0, abs=1e-12)
    assert paired["R@20"]["mean"] == pytest.approx(0.1) and set(results["vs_control"]) == {"dpo", "adaptive_r5"}
    assert "| (6) AlignDistil, adaptive r 5 | +0.100 ± 0.000 |" in table
    assert results["plot"] == "convergence.png"
    assert (tmp_path / "plot" / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "seed2" / "eval" / "eval.json").unlink()
    with pytest.raises(FileNotFoundError, match="seed2/eval/eval.json is missing"):
        aligndistil_mini(tmp_path, {})


# ------------------------------------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
def test_quickstart_aligndistil_runs_in_minutes(tmp_path):
    start = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "tokentrain.cli", "quickstart", "aligndistil", "--run_dir", str(tmp_path / "q")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seconds = time.time() - start
    result = json.loads((tmp_path / "q" / "eval" / "eval.json").read_text())["models"]
    assert set(result) == {"sft", "dpo", "aligndistil"}
    assert all(math.isfinite(r["reward"]) and math.isfinite(r["kl_to_kl_model"]) for r in result.values())
    assert result["dpo"]["reward"] > result["sft"]["reward"]  # DPO learns the task's preference
    assert 0.001 <= result["aligndistil"]["alpha_mean"] <= 5.001
    assert (tmp_path / "q" / "alpha" / "aligndistil_alpha.html").exists()
    assert "quickstart aligndistil finished" in out.stdout
    assert seconds < 600, f"the quickstart took {seconds:.0f} s"


@pytest.mark.slow
def test_mini_recipe_runs_end_to_end_on_small_settings(tmp_path):
    """recipes/aligndistil/mini/ with every stage cut down (64 SFT rows, 3 steps per training stage): all nine rows
    for three seeds, the report and its plot."""
    argv = ["run", str(ROOT / "recipes" / "aligndistil" / "mini"), "--run_dir", str(tmp_path / "mini")]
    argv += ["--sft_rows", "64", "--pref_rows", "64", "--heldout_rows", "16", "--max_steps", "3"]
    argv += ["--reward_curve_every", "1", "--01_sft.max_steps", "20"]
    out = subprocess.run([sys.executable, "-m", "tokentrain.cli", *argv], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "mini" / "report" / "report.json").read_text())
    assert list(report["rows"]) == list(
        __import__("tokentrain.reports.aligndistil", fromlist=["ROWS"]).ROWS
    ) and report["seeds"] == ["seed0", "seed1", "seed2"]
    assert report["rows"]["on_policy"]["curve"]["steps"] == [0, 1, 2, 3]
    assert (tmp_path / "mini" / "report" / "convergence.png").exists()


@pytest.mark.parametrize(
    "kind, values",
    [
        ("prepare", {"task": "keyword_length"}),
        ("prepare", {"task": "chat_preferences"}),
        ("score", {"signal": "aligndistil_alpha"}),
        ("evaluate", {"task": "keyword_length"}),
        ("evaluate", {"task": "generations"}),
    ],
)
def test_stage_variants_are_registered_and_every_key_has_help(kind, values, capsys):
    import dataclasses

    from tokentrain.stages import config_class

    cls = config_class(kind, values)
    assert cls.__module__.split(".")[-1] in (
        "prepare_keyword_length",
        "prepare_chat_preferences",
        "score_aligndistil",
        "evaluate_aligndistil",
    )
    assert all(f.metadata.get("help") for f in dataclasses.fields(cls))
    key, value = next(iter(values.items()))
    assert main([kind, f"--{key}", value, "--help"]) == 0
    assert "--output_dir" in capsys.readouterr().out
