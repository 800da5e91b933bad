"""One small training case per objective, shared by the topology tests and the GPU check.

A case is everything an objective's trainer needs besides the policy: train rows carrying its signal columns (ids
from the policy's own tokenizer, signal values random but seeded), its config keys, and the frozen auxiliary models
it reads, saved to folders as a real run's earlier stages would have written them:

| stem | rows | auxiliary models (folders) |
|---|---|---|
| weighted_ntp | prompt/completion + completion_ids + ref_logps (`prior`) | none (the reference is stored log-probs) |
| critical_dpo | prompt/chosen/rejected + their `*_ids` + rejected_weights | `ref_model` (explicit reference) |
| concept_heads | prompt/completion (phase finetune, full, beta 0.5) | the frozen heads (`heads_path`) |
| aligndistil | prompt/chosen/rejected (off-policy, contrastive teacher) | `dpo_model`, `reverse_model` |
| unlearning | prompt/completion + completion_ids + target_ids + token_weights (`whp`) | none (labels are stored) |

Used by tests/test_topology.py (through tests/scripts/topology_train.py: 2 processes = 1 process, under DDP, FSDP2 and
ZeRO-2/3 on CPU) and bench/gpu_check.py (every objective under ddp, fsdp2, zero2, zero3 on GPUs). `CASES` must name
every stem of `tokentrain.objectives.OBJECTIVES`: a test fails for a stem without a case, so a new objective is
covered by adding its builder here.

The trainers are built as `stage: train` builds them (tokentrain/stages/train.py): the training arguments first (so
ZeRO-3's `zero.Init` partitions the policy as it loads), the policy in float32, an explicit reference loaded frozen
for the trainer to place (`in_engine=True`: a DeepSpeed engine under ZeRO, sharded like the policy under ZeRO-3).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CASE_FILE = "case.json"
# The real-vocabulary shape of bench/gpu_check.py: Qwen2.5-0.5B's width and vocabulary, 4 layers, random weights.
QWEN2_SHAPE = dict(
    vocab_size=151_936,
    hidden_size=896,
    num_hidden_layers=4,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    max_position_embeddings=4096,
)
# The tests' tiny Llama (tests/conftest.py's shape), and the CPU scaling benchmark's.
TINY_SHAPE = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
SMALL_SHAPE = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688, max_positions=1024)
SHAPES = ("tiny", "tiny_untied", "small", "qwen2")

_NAMES = ["Aromi", "The Eagle", "Zizzi", "Cotto", "Giraffe", "Loch Fyne", "The Mill", "Wildwood"]
_FOODS = ["Italian", "French", "English", "Chinese", "Indian", "Japanese", "Fast food"]
_AREAS = ["riverside", "city centre"]
_TAILS = [
    "It is family friendly.",
    "It is not family friendly.",
    "Prices are high and the rating is low.",
    "It has a 5 out of 5 customer rating, near the river.",
    "Its prices are moderate.",
    "",
]


@dataclass
class Case:
    """One objective's training case (see the module docstring); JSON-serialisable, saved as `<folder>/case.json`."""

    stem: str
    rows: list[dict]
    config: dict  # the objective config's own keys (model folders as absolute paths)
    models: dict[str, str] = field(default_factory=dict)  # trainer keyword -> frozen model folder (ref_model)
    aux_attributes: list[str] = field(default_factory=list)  # trainer attributes holding frozen models, once built
    # 1-process layout with the same global batch as 2 processes x batch 2 (sequential order: the same rows per step)
    single_process: dict = field(default_factory=lambda: {"per_device_train_batch_size": 4})

    def save(self, folder: Path) -> Path:
        path = Path(folder) / CASE_FILE
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def load(cls, folder: Path) -> Case:
        return cls(**json.loads((Path(folder) / CASE_FILE).read_text()))


# ---------------------------------------------------------------------------------------------------- the policy


def make_pairs(n: int, seed: int, sentences: int = 1) -> list[tuple[str, str]]:
    """(prompt, completion) pairs shaped like E2E rows; `sentences` repeats the description (longer sequences)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        name, food, area = rng.choice(_NAMES), rng.choice(_FOODS), rng.choice(_AREAS)
        prompt = f"<s>name[{name}], food[{food}], area[{area}]<sep>"
        parts = [f"{name} serves {food} food in the {area}. {rng.choice(_TAILS)}".strip() for _ in range(sentences)]
        pairs.append((prompt, " ".join(parts)))
    return pairs


def build_policy(folder: Path, shape: str = "tiny", vocab: int = 300, seed: int = 0) -> Path:
    """Train a byte-level BPE tokenizer (up to `vocab` tokens) on generated rows and save a random policy with it.

    `tiny`: the tests' 2-layer Llama (hidden 32, tied embeddings, vocabulary = the tokenizer's); `tiny_untied`: the
    same with its own LM head (as most large models have: ZeRO-3 partitions it apart from the embedding). `small`: a
    4-layer Llama of hidden 256 (the CPU scaling benchmark: enough compute per step for processes to matter). `qwen2`: a
    Qwen2-style model of `QWEN2_SHAPE` (151,936 embedding rows, as Qwen2.5: wider than its tokenizer, so every step
    pays the real vocabulary's LM-head and softmax cost).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tokentrain.models import tiny_llama, train_tokenizer

    folder = Path(folder)
    pairs = make_pairs(400, seed=1, sentences=2)
    tokenizer = train_tokenizer([p + c for p, c in pairs] + ["user", "assistant", "system"], vocab_size=vocab)
    if shape == "tiny":
        model = tiny_llama(tokenizer, seed=seed, **TINY_SHAPE)
    elif shape == "tiny_untied":
        from transformers import LlamaForCausalLM

        config = tiny_llama(tokenizer, seed=seed, **TINY_SHAPE).config
        config.tie_word_embeddings = False
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    elif shape == "small":
        model = tiny_llama(tokenizer, seed=seed, **SMALL_SHAPE)
    elif shape == "qwen2":
        config = Qwen2Config(
            **QWEN2_SHAPE,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _perturbed_copy(policy_dir: Path, folder: Path, seed: int, scale: float = 0.05) -> str:
    """The policy plus seeded Gaussian noise, saved with its tokenizer: a frozen model of the same family (what a DPO
    or SFT stage would have written)."""
    from tokentrain.models import load_model, load_tokenizer

    model = load_model(policy_dir, dtype="float32")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    load_tokenizer(policy_dir).save_pretrained(folder)
    return str(Path(folder).resolve())


# ------------------------------------------------------------------------------------------------- case builders


@dataclass
class _Context:
    policy_dir: Path
    folder: Path
    tokenizer: object
    pairs: list[tuple[str, str]]
    generator: torch.Generator


def _sft_ids(ctx: _Context, prompt: str, completion: str) -> list[int]:
    from tokentrain.data import completion_ids_of, tokenize_row

    tokens = tokenize_row({"prompt": prompt, "completion": completion}, ctx.tokenizer)
    return completion_ids_of(tokens["input_ids"], tokens["labels"])


def _weighted_ntp(ctx: _Context) -> Case:
    rows = []
    for prompt, completion in ctx.pairs:
        ids = _sft_ids(ctx, prompt, completion)
        ref_logps = torch.log(0.02 + 0.96 * torch.rand(len(ids), generator=ctx.generator))  # tie-free, in (log .02, 0)
        rows.append(
            {"prompt": prompt, "completion": completion, "completion_ids": ids, "ref_logps": ref_logps.tolist()}
        )
    return Case("weighted_ntp", rows, {"weighting": "prior", "prior_alpha": 1.0})


def _critical_dpo(ctx: _Context) -> Case:
    from tokentrain.data import split_preference_row

    rows = []
    for i, (prompt, chosen) in enumerate(ctx.pairs):
        rejected = ctx.pairs[(i * 7 + 3) % len(ctx.pairs)][1]  # another row's description: a wrong answer
        if rejected == chosen:
            rejected = chosen + " No."
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        split = split_preference_row(row, ctx.tokenizer)
        weights = torch.rand(len(split["rejected_ids"]), generator=ctx.generator)  # in [0, 1)
        rows.append({**row, **split, "rejected_weights": weights.tolist()})
    ref = _perturbed_copy(ctx.policy_dir, ctx.folder / "ref_model", seed=11)
    # position_mean counts every column of each padded micro-batch: 2 processes x batch 2 pad each rank's rows apart,
    # exactly as 1 process x batch 2 x 2 accumulation micro-batches does (a batch of 4 would pad all four together)
    return Case(
        "critical_dpo",
        rows,
        {"reduction": "position_mean", "weighting": "rejected", "beta": 0.5},
        models={"ref_model": ref},
        aux_attributes=["ref_model"],
        single_process={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
    )


def _concept_heads(ctx: _Context) -> Case:
    from tokentrain.heads import AuxHeads, AuxHeadsConfig
    from tokentrain.models import load_model

    heads = AuxHeads.attach(load_model(ctx.policy_dir, dtype="float32"), AuxHeadsConfig(2, "decoder_layer"))
    with torch.no_grad():  # away from the copy of the last layer, so that the heads' term differs from the NTP one
        for p in heads.parameters():
            p.add_(0.2 * p.std() * torch.randn(p.shape, generator=ctx.generator))
    folder = heads.save(ctx.folder / "heads")
    rows = [{"prompt": p, "completion": c} for p, c in ctx.pairs]
    config = {
        "phase": "finetune",
        "finetune": "full",
        "num_aux_heads": 2,
        "beta": 0.5,  # a large head term: the heads' gradients into the trunk matter in the comparison
        "heads_path": str(Path(folder).resolve()),
    }
    return Case("concept_heads", rows, config, aux_attributes=["aux_heads"])


def _aligndistil(ctx: _Context) -> Case:
    rows = []
    for i, (prompt, chosen) in enumerate(ctx.pairs):
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": ctx.pairs[(i + 5) % len(ctx.pairs)][1]})
    # teachers far from the student (noise of 3x each weight's spread): a KL, and steps, far above 1e-5
    dpo = _perturbed_copy(ctx.policy_dir, ctx.folder / "dpo_model", seed=21, scale=3.0)
    reverse = _perturbed_copy(ctx.policy_dir, ctx.folder / "reverse_model", seed=22, scale=3.0)
    config = {"dpo_model": dpo, "reverse_model": reverse, "teacher": "contrastive", "alpha": "adaptive"}
    return Case("aligndistil", rows, config, aux_attributes=["dpo_model", "other_model"])


def _unlearning(ctx: _Context) -> Case:
    vocab = len(ctx.tokenizer)
    rows = []
    for prompt, completion in ctx.pairs:
        ids = _sft_ids(ctx, prompt, completion)
        targets = torch.randint(4, vocab, (len(ids),), generator=ctx.generator)  # generic labels, no special token
        weights = (torch.rand(len(ids), generator=ctx.generator) < 0.7).float()  # some positions excluded
        weights[0] = 1.0  # every row trains on at least one position
        rows.append(
            {
                "prompt": prompt,
                "completion": completion,
                "completion_ids": ids,
                "target_ids": targets.tolist(),
                "token_weights": weights.tolist(),
            }
        )
    return Case("unlearning", rows, {"unlearning_loss": "whp"})


CASES: dict[str, Callable[[_Context], Case]] = {
    "weighted_ntp": _weighted_ntp,
    "critical_dpo": _critical_dpo,
    "concept_heads": _concept_heads,
    "aligndistil": _aligndistil,
    "unlearning": _unlearning,
}


def missing_cases() -> list[str]:
    """Objective stems of OBJECTIVES without a case here (must be empty)."""
    from tokentrain.objectives import OBJECTIVES

    return sorted(set(OBJECTIVES) - set(CASES))


def build_case(stem: str, policy_dir: Path, folder: Path, rows: int = 24, seed: int = 0, sentences: int = 1) -> Path:
    """Build `stem`'s case for the policy in `policy_dir` into `folder` (rows, auxiliary models, case.json)."""
    from tokentrain.models import load_tokenizer

    if stem not in CASES:
        raise KeyError(f"objective {stem!r} has no case in bench/objective_cases.py CASES: add a builder for it")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ctx = _Context(
        policy_dir=Path(policy_dir),
        folder=folder,
        tokenizer=load_tokenizer(policy_dir),
        pairs=make_pairs(rows, seed=100 + seed, sentences=sentences),
        generator=torch.Generator().manual_seed(seed),
    )
    case = CASES[stem](ctx)
    assert case.stem == stem, (case.stem, stem)
    case.save(folder)
    return folder


# ------------------------------------------------------------------------------------------------------ training


def make_trainer(case: Case, policy_dir: Path, output_dir: Path, **train_args):
    """The objective's trainer on `case`, built as the train stage builds it; `train_args` are config keys
    (topology, optimiser, steps) that win over the case's own."""
    from datasets import Dataset

    from tokentrain.models import load_model, load_tokenizer
    from tokentrain.objectives import objective
    from tokentrain.stages.base import default_dtype

    config_cls, trainer_cls = objective(case.stem)
    args = config_cls(output_dir=str(output_dir), **{**case.config, **train_args})  # before the models: ZeRO-3
    tokenizer = load_tokenizer(policy_dir)
    model = load_model(policy_dir, dtype="float32")
    frozen = {
        key: load_model(path, dtype=default_dtype(False), trainable=False, in_engine=True, merge_adapter=True)
        for key, path in case.models.items()
    }
    return trainer_cls(
        model=model, args=args, train_dataset=Dataset.from_list(case.rows), processing_class=tokenizer, **frozen
    )


def _numel(p) -> tuple[int, int]:
    """(elements held by this process, elements of the whole parameter) of a plain, ZeRO-3 or FSDP2 parameter."""
    if hasattr(p, "ds_numel"):  # ZeRO-3: the local partition is ds_tensor, the parameter itself is empty
        return p.ds_tensor.numel(), p.ds_numel
    if type(p).__name__ == "DTensor":
        return p.to_local().numel(), p.numel()
    return p.numel(), p.numel()


def placement(trainer, attributes: list[str]) -> dict[str, dict]:
    """How the policy and each frozen model sit on this process: elements held here / whole, and the wrapper's
    class (a DeepSpeed engine, an FSDP2 module, or the plain model)."""
    out = {}
    for name in ["model", *attributes]:
        obj = trainer.model_wrapped if name == "model" else getattr(trainer, name, None)
        if obj is None:
            continue
        local = full = 0
        for p in obj.parameters():
            a, b = _numel(p)
            local, full = local + a, full + b
        out[name] = {"local": local, "full": full, "wrapper": type(obj).__name__}
    return out


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in `folder` (the final save, not the checkpoints)."""
    from safetensors.torch import load_file

    weights = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        weights.update(load_file(str(f)))
    if not weights:
        raise FileNotFoundError(f"no safetensors file in {folder}")
    return weights


def reload_check(folder: Path, weights: dict[str, torch.Tensor]) -> int:
    """Load the saved folder as a model (as a later stage would) and check it: every parameter was saved (a tied head
    may be saved once, under its embedding's name), each equals its saved tensor and is finite. Returns the number of
    parameters loaded."""
    from tokentrain.models import load_model

    model = load_model(folder, dtype="float32", trainable=False)
    state = model.state_dict()
    saved_storage = {state[k].data_ptr() for k in weights if k in state}
    missing = [k for k in state if k not in weights and state[k].data_ptr() not in saved_storage]
    if missing:
        raise KeyError(f"{folder}: the save lacks {len(missing)} of the model's tensors, e.g. {missing[:3]}")
    for name, tensor in weights.items():
        if name not in state:
            raise KeyError(f"{folder}: saved tensor {name} is not a parameter of the reloaded model")
        if not torch.equal(state[name].float(), tensor.float()):
            raise ValueError(f"{folder}: {name} differs after reloading")
        if not torch.isfinite(tensor.float()).all():
            raise ValueError(f"{folder}: {name} is not finite")
    return sum(p.numel() for p in model.parameters())


def force_fsdp_on_cpu() -> None:
    """Let accelerate 1.16 run its FSDP2 path on a CPU (gloo) process group, for tests and the CPU smoke check.

    accelerate's `AcceleratorState` selects FSDP only when the process group is on an accelerator (MULTI_GPU, NPU,
    XPU, ...): on CPU (`ACCELERATE_USE_CPU=true`, distributed type MULTI_CPU) it silently ignores `distributed_type:
    FSDP` and trains with DDP. PyTorch's `fully_shard` itself runs on CPU with gloo (DTensor shards, all-gather and
    reduce-scatter), so this patch sets the distributed type to FSDP when an FSDP plugin was configured; everything
    after that (`fsdp2_prepare_model`, TRL's `prepare_fsdp`, full-state-dict saving) is accelerate's own code.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_tokentrain_cpu_fsdp", False):
        return
    seen = {}  # every later AcceleratorState() copies PartialState's MULTI_CPU back: set FSDP again each time

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        plugin = fsdp_plugin or seen.get("plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            seen["plugin"] = plugin
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    __init__._tokentrain_cpu_fsdp = True
    AcceleratorState.__init__ = __init__
