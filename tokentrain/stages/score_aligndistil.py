"""`stage: score`, `signal: aligndistil_alpha`: AlignDistil's per-token D_t and α_t on prompt + chosen, for inspection
(spec aligndistil section 2; training never reads these columns, the trainer computes its teacher online).

The frozen DPO model and the other model (`reverse_model` for `teacher: contrastive`, `reference_model` for `dpo_ref`)
read each row split as TRL's DPOTrainer splits it (`signals/aligndistil_alpha.py`). Writes the rows with
`completion_ids` (TRL's `chosen_ids`), `aligndistil_distance` and `aligndistil_alpha` (one float per completion id) as
a `datasets` folder, `signal_meta.json` (signal, tokenizer as an absolute path, the teacher settings, means) and
`aligndistil_alpha.html`, the `tokentrain inspect` heat map of the first `html_rows` rows.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

from .base import ConfigError, ModelKeys, RowsStage, Stage, StageContext, load_stage_rows, require, stage_output

logger = logging.getLogger(__name__)

OTHER_KEY = {"contrastive": "reverse_model", "dpo_ref": "reference_model"}


@dataclass
class Config(RowsStage, ModelKeys):
    signal: str = field(default="aligndistil_alpha", metadata={"help": "aligndistil_alpha."})
    dpo_model: str = field(default="", metadata={"help": "The DPO model (folder, adapter or hub id)."})
    reverse_model: str = field(default="", metadata={"help": "The reverse-DPO model (teacher 'contrastive')."})
    reference_model: str = field(default="", metadata={"help": "The reference (SFT) model (teacher 'dpo_ref')."})
    teacher: str = field(default="contrastive", metadata={"help": "'contrastive' or 'dpo_ref', as in training."})
    alpha: str = field(default="adaptive", metadata={"help": "'adaptive' (r·D_t + eps) or 'constant' (ratio)."})
    r: float = field(default=20.0, metadata={"help": "Adaptive bound, tvd convention (alpha 'adaptive')."})
    eps: float = field(default=1e-3, metadata={"help": "Adaptive floor (alpha 'adaptive')."})
    ratio: float = field(default=1.0, metadata={"help": "Constant α (alpha 'constant')."})
    distance: str = field(default="tvd", metadata={"help": "'tvd' (paper) or 'l1' (official code)."})
    batch_size: int = field(default=16, metadata={"help": "Rows per forward (sorted by length, longest first)."})
    chunk_tokens: int = field(default=256, metadata={"help": "Response positions projected through the heads at once."})
    html_rows: int = field(default=50, metadata={"help": "Rows shown in aligndistil_alpha.html (0: no page)."})


def settings_of(stage: Stage):
    """The teacher settings; a key with no effect under the chosen teacher/alpha is an error naming it."""
    from ..losses.aligndistil import TeacherSettings

    cfg = stage.config
    adaptive = cfg.alpha == "adaptive"
    idle = ["ratio"] if adaptive else ["r", "eps"]
    idle += [OTHER_KEY[t] for t in OTHER_KEY if t != cfg.teacher]
    given = [k for k in idle if k in stage.given]
    if given:
        raise ConfigError(
            f"{stage.name}: {', '.join(given)} has no effect with teacher {cfg.teacher!r} and alpha {cfg.alpha!r}: "
            "remove it"
        )
    try:
        return TeacherSettings(cfg.teacher, cfg.alpha, cfg.r, cfg.eps, cfg.ratio, cfg.distance)
    except ValueError as e:
        raise ConfigError(f"{stage.name}: {e}") from None


def run(stage: Stage, ctx: StageContext) -> None:
    from accelerate import Accelerator

    from ..data import write_meta
    from ..models import load_model, load_tokenizer
    from ..signals.aligndistil_alpha import COLUMNS, score_aligndistil_alpha
    from .score import _tokenizer_name

    cfg = stage.config
    settings = settings_of(stage)
    other_key = OTHER_KEY.get(cfg.teacher, "reverse_model")
    require(stage, "dpo_model", other_key, "dataset", why=f"(signal 'aligndistil_alpha', teacher {cfg.teacher!r})")
    if cfg.batch_size < 1 or cfg.chunk_tokens < 1 or cfg.html_rows < 0:
        raise ConfigError(f"{stage.name}: batch_size and chunk_tokens must be >= 1 and html_rows >= 0")
    accelerator = Accelerator()
    tokenizer = load_tokenizer(cfg.dpo_model)  # the policy's: the DPO stage saves it beside the model
    kwargs = cfg.model_kwargs(trainable=False)
    dpo = load_model(cfg.dpo_model, merge_adapter=True, trainable=False, **kwargs).to(accelerator.device)
    other = load_model(getattr(cfg, other_key), merge_adapter=True, trainable=False, **kwargs).to(accelerator.device)
    dataset = load_stage_rows(cfg)
    with stage_output(stage, ctx) as tmp:
        columns = score_aligndistil_alpha(
            dataset,
            dpo,
            other,
            tokenizer,
            settings,
            batch_size=cfg.batch_size,
            chunk_tokens=cfg.chunk_tokens,
            accelerator=accelerator,
            names=("dpo_model", other_key),
        )
        if not accelerator.is_main_process:
            return
        from datasets import Sequence, Value

        dataset = dataset.remove_columns([c for c in COLUMNS if c in dataset.column_names])
        for name in COLUMNS:
            dtype = "int32" if name.endswith("_ids") else "float32"
            dataset = dataset.add_column(name, columns[name], feature=Sequence(Value(dtype)))
        dataset.save_to_disk(str(tmp))
        alphas = [a for row in columns["aligndistil_alpha"] for a in row]
        distances = [d for row in columns["aligndistil_distance"] for d in row]
        meta = {
            "signal": "aligndistil_alpha",
            "dpo_model": cfg.dpo_model,
            other_key: getattr(cfg, other_key),
            "settings": {k: getattr(settings, k) for k in ("teacher", "alpha", "r", "eps", "ratio", "distance")},
            "tokenizer": _tokenizer_name(tokenizer),
            "vocab_size": len(tokenizer),
            "rows": len(dataset),
            "positions": len(alphas),
            "alpha_mean": statistics.mean(alphas),
            "distance_mean": statistics.mean(distances),
        }
        write_meta(tmp, meta)
        if cfg.html_rows:
            from ..heatmap import write_heatmap

            write_heatmap(
                dataset,
                tokenizer,
                "aligndistil_alpha",
                tmp / "aligndistil_alpha.html",
                ids_column="completion_ids",
                max_rows=cfg.html_rows,
            )
        logger.info(
            "scored %d rows (%d response tokens), %s: mean D_t %.4f, mean α_t %.4f -> %s",
            len(dataset),
            len(alphas),
            settings.describe(),
            meta["distance_mean"],
            meta["alpha_mean"],
            cfg.output_dir,
        )
