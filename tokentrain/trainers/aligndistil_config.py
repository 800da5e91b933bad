"""`AlignDistilConfig`: `SFTConfig` plus AlignDistil's teacher (spec section 3); the trainer is in `aligndistil.py`."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from ..losses.aligndistil import ALPHAS, DISTANCES, TEACHERS, TeacherSettings

OTHER_KEY = {"contrastive": "reverse_model", "dpo_ref": "reference_model"}  # the "other" model's config key
DEFAULT_R, DEFAULT_EPS, DEFAULT_RATIO = 20.0, 1e-3, 1.0
DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_PROMPT_LENGTH = 1024, 1024


@dataclass
class AlignDistilConfig(SFTConfig):
    """`SFTConfig` plus AlignDistil's teacher (spec section 3). Keys with no effect under the chosen mode are errors:
    `ratio` with `alpha: adaptive`, `r`/`eps` with `alpha: constant`, `max_new_tokens`/`max_prompt_length` off-policy,
    the wrong one of `reverse_model`/`reference_model` for the teacher."""

    dpo_model: str | None = field(
        default=None, metadata={"help": "The DPO model (path or hub id): the DPO stage's output. Required."}
    )
    reverse_model: str | None = field(
        default=None,
        metadata={
            "help": "The reverse-DPO model (trained on swapped preferences); required with teacher 'contrastive'."
        },
    )
    reference_model: str | None = field(
        default=None, metadata={"help": "The reference (SFT) model; required with teacher 'dpo_ref'."}
    )
    teacher: str = field(
        default="contrastive",
        metadata={
            "help": "'contrastive' (z* = z_dpo + α (z_dpo − z_reverse), paper Eq.15/17) or 'dpo_ref' (Theorem 1: "
            "z* = z_ref + α (z_dpo − z_ref), constant ratio only).",
            "choices": list(TEACHERS),
        },
    )
    alpha: str = field(
        default="adaptive",
        metadata={"help": "'adaptive' (α_t = r·D_t + eps) or 'constant' (α_t = ratio).", "choices": list(ALPHAS)},
    )
    r: float | None = field(
        default=None,
        metadata={"help": "Adaptive bound, tvd convention (= 2 × the code's --beta2); default 20.0 with adaptive."},
    )
    eps: float | None = field(default=None, metadata={"help": "Adaptive floor of α_t; default 0.001 with adaptive."})
    ratio: float | None = field(
        default=None, metadata={"help": "Constant α = β0/β of Theorem 1; default 1.0 with alpha 'constant'."}
    )
    distance: str = field(
        default="tvd",
        metadata={
            "help": "D_t: 'tvd' (1/2 Σ|p_dpo − p_other|, paper) or 'l1' (Σ|…|, official code).",
            "choices": list(DISTANCES),
        },
    )
    beta0: float = field(default=0.1, metadata={"help": "β0 of β_t = β0/α_t; must equal the DPO stage's beta."})
    on_policy: bool = field(
        default=False, metadata={"help": "Sample the responses from the student (one per prompt, per micro-batch)."}
    )
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "On-policy sample length; default 1024 with on_policy."}
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "On-policy: prompts with more tokens are dropped and reported; default 1024 with on_policy."},
    )
    chunk_tokens: int = field(default=256, metadata={"help": "Response positions projected through the heads at once."})

    def __post_init__(self):
        problems = []
        if self.alpha == "adaptive" and self.ratio is not None:
            problems.append(
                "ratio has no effect with alpha 'adaptive' (α_t = r·D_t + eps): remove it or use 'constant'"
            )
        if self.alpha == "constant":
            given = [k for k in ("r", "eps") if getattr(self, k) is not None]
            if given:
                problems.append(f"{'/'.join(given)} has no effect with alpha 'constant' (α_t = ratio): remove it")
        if self.teacher in OTHER_KEY:
            wrong = OTHER_KEY["dpo_ref" if self.teacher == "contrastive" else "contrastive"]
            if getattr(self, wrong) is not None:
                problems.append(
                    f"{wrong} has no effect with teacher {self.teacher!r}, whose other model is "
                    f"{OTHER_KEY[self.teacher]}: remove it or change the teacher"
                )
        if not self.on_policy:
            given = [k for k in ("max_new_tokens", "max_prompt_length") if getattr(self, k) is not None]
            if given:
                problems.append(f"{'/'.join(given)} has no effect off-policy: remove it or set on_policy: true")
        for key in ("max_new_tokens", "max_prompt_length"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int) and value >= 1):
                problems.append(f"{key} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.chunk_tokens, int) and self.chunk_tokens >= 1):
            problems.append(f"chunk_tokens must be an integer >= 1, got {self.chunk_tokens!r}")
        if self.assistant_only_loss:
            problems.append(
                "assistant_only_loss has no effect: aligndistil trains on the chosen response (or the sample) only"
            )
        if self.packing or self.padding_free:
            problems.append(
                "packing/padding_free must be off: the three models would each need the packed attention layout, and "
                "per-sequence normalisation needs whole rows; use padded batches"
            )
        if problems:
            raise ValueError("invalid aligndistil settings:\n- " + "\n- ".join(problems))
        try:
            self.teacher_settings()
        except ValueError as e:
            raise ValueError(str(e).replace("teacher settings", "settings")) from None
        super().__post_init__()

    def teacher_settings(self) -> TeacherSettings:
        """The teacher with the mode's defaults filled in (validated: finite and > 0, names in their sets)."""
        adaptive = self.alpha == "adaptive"
        return TeacherSettings(
            teacher=self.teacher,
            alpha=self.alpha,
            r=(DEFAULT_R if self.r is None else self.r) if adaptive else DEFAULT_R,
            eps=(DEFAULT_EPS if self.eps is None else self.eps) if adaptive else DEFAULT_EPS,
            ratio=DEFAULT_RATIO if self.ratio is None else self.ratio,
            distance=self.distance,
            beta0=self.beta0,
        )

    @property
    def sample_tokens(self) -> int:
        return DEFAULT_MAX_NEW_TOKENS if self.max_new_tokens is None else self.max_new_tokens

    @property
    def prompt_limit(self) -> int:
        return DEFAULT_MAX_PROMPT_LENGTH if self.max_prompt_length is None else self.max_prompt_length
