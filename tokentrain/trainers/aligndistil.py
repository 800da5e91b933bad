"""`AlignDistilTrainer`: token-level alignment as adaptive policy distillation (AlignDistil, arXiv 2503.02832).

Spec: specs/aligndistil.md sections 2, 3 and 9. The loss math is in `losses/aligndistil.py`; this file feeds it.

The student minimises (1/S) Σ_i (1/|M_i|) Σ_t β_t KL(π_θ ‖ π*) with the teacher z* = z_dpo + α_t (z_dpo − z_other)
(`teacher: contrastive`, the other model is a reverse-DPO model) or z_other + α_t (z_dpo − z_other) (`dpo_ref`, the
other model is the reference/SFT model), α_t = r·D_t + ε or a constant `ratio`, β_t = β0/α_t. The signal is online:
both frozen models run at every step, under no_grad, and nothing is stored.

Built on `TokenSFTTrainer` (TRL 1.16's `SFTTrainer`): a row is one sequence, prompt + response with labels on the
response, and the step's normaliser is the number of sequences (`count_items`), summed over the accumulation window
and the processes by the base. What changes against the base:
1. `_prepare_dataset`: off-policy rows (`prompt`, `chosen`; `rejected` is ignored and counted) are split exactly as
   TRL 1.16's `DPOTrainer` splits them (`data.split_preference_row`), so `input_ids` = prompt_ids + chosen_ids, the
   sequences the DPO models were trained on. Empty or fully truncated responses are counted, reported and dropped.
   On-policy rows are prompts (tokenised as the DPO split tokenises them), too-long prompts dropped and reported.
2. `AlignDistilCollator`: right-padded (off-policy) or left-padded prompts (on-policy), plus each row's index.
3. `compute_loss`: on-policy, one sample per prompt from the current student first (`_rollout`); then, inside the
   student's wrapper forward (`_ForwardRedirection`, as TRL's DistillationTrainer, so DDP/ZeRO-3/FSDP see a forward):
   the three backbones only (`base_model(...).last_hidden_state`), the N response positions gathered (position P−1 …
   P+T−2 for a response at P of T tokens), and `aligndistil_loss` over chunks of `chunk_tokens` positions. No model's
   [B, T, V] logits ever exist.
4. The frozen models are checked (`models.check_auxiliary_models`) and placed as TRL's `DPOTrainer` places a
   reference model (`_place`).

[paper ≠ code] Positions: the paper's P−1 … P+T−2, not the official code's (spec section 2, `losses/aligndistil.py`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from dataclasses import dataclass

import torch
from datasets import Dataset
from torch.distributed.tensor import DTensor
from trl.data_utils import _tokenize, is_conversational
from trl.models.utils import _ForwardRedirection, prepare_deepspeed, prepare_fsdp, unwrap_model_for_generation
from trl.trainer.utils import maybe_gather_lm_head_ctx

from ..data import check_pair_prompt, require_columns, split_preference_row
from ..losses.aligndistil import (
    NonFiniteLogitsError,
    aligndistil_loss,
)
from ..models import (
    causal_lm,
    check_auxiliary_models,
    cut_after_eos,
    load_model,
    model_name,
    sampling_kwargs,
    training_arg,
    warn_if_same,
)
from ..papers import PAPERS
from ..tokens import IGNORE_INDEX
from .aligndistil_config import OTHER_KEY, AlignDistilConfig
from .base import TokenSFTTrainer

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------ data


@dataclass
class AlignDistilCollator:
    """Batches of AlignDistil rows: `input_ids`, `attention_mask`, `labels` (-100 on prompt and padding) and
    `row_index` (B,) (the dataset row, for error messages). Off-policy rows are right-padded, so position ids start at
    0 in every row; on-policy rows are prompts, left-padded for generation, with labels all -100 (the responses are
    sampled in `compute_loss`). E.g. rows [5, 6 | 7] and [8 | 9, 10] (prompt | response), pad 0: input_ids
    [[5, 6, 7, 0], [8, 9, 10, 0]], labels [[-100, -100, 7, -100], [-100, 9, 10, -100]]."""

    pad_token_id: int
    on_policy: bool = False

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in examples)
        n = len(examples)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for b, ex in enumerate(examples):
            k = len(ex["input_ids"])
            cols = slice(width - k, width) if self.on_policy else slice(0, k)
            input_ids[b, cols] = torch.tensor(ex["input_ids"], dtype=torch.long)
            attention_mask[b, cols] = 1
            if not self.on_policy:
                labels[b, cols] = torch.tensor(ex["labels"], dtype=torch.long)
        row_index = torch.tensor([ex["row_index"] for ex in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "row_index": row_index}


def _is_empty_text(completion, eos_token: str) -> bool:
    if isinstance(completion, list):
        return all(not m.get("content") for m in completion)
    return completion in ("", eos_token)


def _prompt_ids(example: dict, tokenizer) -> list[int]:
    """The prompt as the DPO split tokenises it: the chat template with the generation prompt, or the plain text."""
    prompt = example["prompt"]
    if is_conversational(example):
        tools = example.get("tools")
        kwargs = {"tools": json.loads(tools) if isinstance(tools, str) else tools}
        kwargs.update(example.get("chat_template_kwargs") or {})
        return list(_tokenize(tokenizer, prompt, add_generation_prompt=True, **kwargs)["input_ids"])
    return list(_tokenize(tokenizer, prompt)["input_ids"])


# --------------------------------------------------------------------------------------------------- trainer


class AlignDistilTrainer(TokenSFTTrainer):
    """AlignDistil (spec section 3). Train rows: `prompt` + `chosen` (off-policy) or `prompt` (on-policy). The DPO and
    other models come from `args.dpo_model` and `args.reverse_model`/`args.reference_model` (paths or hub ids, loaded
    frozen in the student's dtype), or as model objects (`dpo_model=`, `other_model=`)."""

    metric_prefix = "aligndistil"
    _tag_names = ["trl", "tokentrain", "aligndistil"]
    _name = "AlignDistil"
    _paper = PAPERS["aligndistil"]
    signal_columns = ()

    def __init__(
        self,
        model,
        args: AlignDistilConfig,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        dpo_model=None,
        other_model=None,
        **kwargs,
    ):
        if not isinstance(args, AlignDistilConfig):
            raise TypeError(f"args must be an AlignDistilConfig, got {type(args).__name__}")
        if kwargs.get("data_collator") is not None:
            raise ValueError("data_collator is not supported: AlignDistilTrainer collates its own rows")
        self.settings = args.teacher_settings()
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.data_collator = AlignDistilCollator(
            pad_token_id=self._tokenizer.pad_token_id
            if self._tokenizer.pad_token_id is not None
            else self._tokenizer.eos_token_id,
            on_policy=args.on_policy,
        )
        self.other_key = OTHER_KEY[args.teacher]
        self.dpo_model, self.other_model = self._frozen_models(dpo_model, other_model)
        self._forward_redirection = _ForwardRedirection()
        logger.info(
            "AlignDistil: %s, %s, chunk %d positions; dpo_model %s, %s %s",
            f"on-policy (HF generate, T 1.0, top_p 1.0, top_k 0, {args.sample_tokens} new tokens)"
            if args.on_policy
            else "off-policy (prompt + chosen)",
            self.settings.describe(),
            args.chunk_tokens,
            self.dpo_name,
            self.other_key,
            self.other_name,
        )

    # ------------------------------------------------------------------------------------------- frozen models

    def _frozen_models(self, dpo_model, other_model):
        """Load (or take) the DPO and other model, check them against the student, place them as TRL places a
        reference model."""
        args = self.args
        student = self.accelerator.unwrap_model(self.model)
        dtype = str(getattr(student, "dtype", torch.float32)).removeprefix("torch.")
        models = []
        for key, given in (("dpo_model", dpo_model), (self.other_key, other_model)):
            path = getattr(args, key)
            if given is None:
                if path is None:
                    raise ValueError(
                        f"{key} is required with teacher {args.teacher!r}: set it to the "
                        f"{'DPO' if key == 'dpo_model' else self.other_key.replace('_model', '')} model's path"
                    )
                # under DeepSpeed the model goes into an engine (`_place`), so ZeRO-3 loads it partitioned like the policy
                given = load_model(
                    path, dtype=dtype, merge_adapter=True, trainable=False, in_engine=self.is_deepspeed_enabled
                )
            given.eval()
            given.requires_grad_(False)
            models.append((given, f"{key} ({model_name(given, path or 'in-memory model')})"))
        (dpo, self.dpo_name), (other, self.other_name) = models
        student_name = f"the student ({model_name(student, 'in-memory model')})"
        check_auxiliary_models(self._tokenizer, [(student, student_name), *models])
        warn_if_same(dpo, other, (self.dpo_name, self.other_name), self.settings.same_models_note())
        stage_beta = training_arg(args.dpo_model, "beta")
        if stage_beta is not None and not math.isclose(stage_beta, args.beta0, rel_tol=1e-9):
            warnings.warn(
                f"beta0 is {args.beta0} but {self.dpo_name} was trained with beta {stage_beta}: β0 must be the DPO "
                "stage's beta (Theorem 1)",
                UserWarning,
                stacklevel=3,
            )
        return self._place(dpo), self._place(other)

    def _place(self, model):
        """As TRL 1.16's DPOTrainer places `ref_model`: DeepSpeed inference engine (sharded under ZeRO-3, a stage-0
        replica otherwise), FSDP (sharded like the policy), or evaluation mode on the device."""
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(model, self.accelerator)
        if self.is_fsdp_enabled:
            if self.accelerator.state.fsdp_plugin.fsdp_version != 2:
                raise ValueError(
                    "aligndistil reads each LM head's weight outside that model's forward, which FSDP1's flat shards "
                    "do not allow: use FSDP2 (fsdp_version: 2, accelerate_configs/fsdp2.yaml), DeepSpeed or DDP"
                )
            return prepare_fsdp(model, self.accelerator)
        return self.accelerator.prepare_model(model, evaluation_mode=True)

    # ---------------------------------------------------------------------------------------------------- data

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if not isinstance(dataset, Dataset):
            raise ValueError(
                f"the {dataset_name} dataset is a {type(dataset).__name__}: aligndistil needs a map-style Dataset "
                "(rows are checked and empty responses counted before training)"
            )
        if "input_ids" in dataset.column_names:
            raise ValueError(
                f"the {dataset_name} dataset is already tokenised (has 'input_ids'); pass prompt/chosen rows (or "
                "prompts, on-policy): tokentrain splits them as TRL's DPOTrainer does"
            )
        if formatting_func is not None:
            raise ValueError("formatting_func is not supported: format rows into prompt/chosen before training")
        tokenizer = self._tokenizer
        if args.on_policy:
            require_columns(dataset, ["prompt"], hint="on-policy aligndistil samples the responses from the prompts")
            return self._prepare_prompts(dataset, tokenizer, args, dataset_name)
        require_columns(dataset, ["prompt", "chosen"], hint="off-policy aligndistil trains on prompt + chosen")
        if "rejected" in dataset.column_names:
            logger.info("%s: the `rejected` column of %d rows is ignored (off-policy)", dataset_name, len(dataset))
        keep = [
            c for c in ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs") if c in dataset.column_names
        ]

        def process(example, idx):
            example = {**example, "rejected": example.get("rejected", example["chosen"])}
            check_pair_prompt(example, idx)
            split = split_preference_row(example, tokenizer)
            prompt, response = split["prompt_ids"], split["chosen_ids"]
            ids = prompt + response
            labels = [IGNORE_INDEX] * len(prompt) + response
            if args.max_length is not None and len(ids) > args.max_length:
                cut = (
                    slice(None, args.max_length)
                    if args.truncation_mode == "keep_start"
                    else slice(-args.max_length, None)
                )
                ids, labels = ids[cut], labels[cut]
            empty = _is_empty_text(example["chosen"], tokenizer.eos_token)
            n_positions = 0 if empty else sum(1 for lab in labels[1:] if lab != IGNORE_INDEX)
            return {
                "input_ids": ids,
                "labels": labels,
                "row_index": idx,
                "_n_positions": n_positions,
                "_p": len(prompt),
            }

        processed = dataset.select_columns(keep).map(
            process,
            with_indices=True,
            remove_columns=keep,
            desc=f"Splitting {dataset_name} rows as TRL's DPO does (prompt + chosen)",
        )
        no_prompt = [i for i, n in enumerate(processed["_p"]) if n == 0]
        if no_prompt:
            raise ValueError(
                f"{dataset_name} rows {no_prompt[:10]} have no prompt token, so no position predicts their first "
                "response token: give every row a prompt (e.g. starting with BOS)"
            )
        empty = [i for i, n in enumerate(processed["_n_positions"]) if n == 0]
        if empty:
            logger.warning(
                "%s: %d of %d rows have an empty or fully truncated chosen response and are not trained on; first: %s",
                dataset_name,
                len(empty),
                len(processed),
                empty[:10],
            )
            processed = processed.filter(lambda n: n > 0, input_columns="_n_positions")
        if len(processed) == 0:
            raise ValueError(f"the {dataset_name} dataset has no row with a response token left to train on")
        return processed.remove_columns(["_n_positions", "_p"])

    def _prepare_prompts(self, dataset, tokenizer, args, dataset_name):
        def process(example, idx):
            ids = _prompt_ids(example, tokenizer)
            return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids), "row_index": idx}

        keep = [c for c in ("prompt", "tools", "chat_template_kwargs") if c in dataset.column_names]
        processed = dataset.select_columns(keep).map(
            process, with_indices=True, remove_columns=keep, desc=f"Tokenising {dataset_name} prompts"
        )
        lengths = [len(ids) for ids in processed["input_ids"]]
        empty = [i for i, n in enumerate(lengths) if n == 0]
        if empty:
            raise ValueError(f"{dataset_name} rows {empty[:10]} have an empty prompt: generation needs a context")
        too_long = [i for i, n in enumerate(lengths) if n > args.prompt_limit]
        if too_long:
            logger.warning(
                "%s: %d of %d prompts have more than max_prompt_length=%d tokens and are dropped; first: %s",
                dataset_name,
                len(too_long),
                len(processed),
                args.prompt_limit,
                too_long[:10],
            )
            processed = processed.filter(lambda ids: len(ids) <= args.prompt_limit, input_columns="input_ids")
        if len(processed) == 0:
            raise ValueError(f"the {dataset_name} dataset has no prompt of at most {args.prompt_limit} tokens")
        return processed

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "labels", "row_index"]

    # ------------------------------------------------------------------------------------------------ normaliser

    def count_items(self, batch):
        """The micro-batch's share of S, the step's sequence count: every row has at least one response position
        (empty responses are dropped when prepared; every sample has at least one token)."""
        return torch.tensor(batch["input_ids"].shape[0])

    # ------------------------------------------------------------------------------------------------- rollouts

    def _rollout(self, model, inputs) -> dict[str, torch.Tensor]:
        """One sample per prompt from the current student (eval mode, no gradient), cut after its first EOS (never
        forced), re-collated right-padded as off-policy rows: labels on the sampled tokens."""
        prompts, prompt_mask = inputs["input_ids"], inputs["attention_mask"]  # (B, W) left-padded
        width = prompts.shape[1]
        with (
            torch.no_grad(),
            unwrap_model_for_generation(
                model, self.accelerator, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
            ) as unwrapped,
        ):
            was_training = unwrapped.training
            unwrapped.eval()
            try:
                # every sampling setting explicit (spec section 3): T 1.0, top_p 1.0, top_k 0, neutral other filters
                settings = sampling_kwargs(self._tokenizer, self.args.sample_tokens)
                out = unwrapped.generate(input_ids=prompts, attention_mask=prompt_mask, **settings)
            finally:
                unwrapped.train(was_training)
        samples = out[:, width:]  # (B, G)
        eos = self._tokenizer.eos_token_id
        rows, truncated = [], 0
        for b in range(prompts.shape[0]):
            prompt = prompts[b][prompt_mask[b].bool()].tolist()
            response, ended = cut_after_eos(samples[b].tolist(), eos)
            truncated += not ended
            rows.append({"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response})
        for row, index in zip(rows, inputs["row_index"].tolist()):
            row["row_index"] = index
        batch = AlignDistilCollator(pad_token_id=self.data_collator.pad_token_id)(rows)
        batch = {k: v.to(prompts.device) for k, v in batch.items()}
        batch["_truncated"] = torch.tensor(float(truncated), device=prompts.device)
        return batch

    # ------------------------------------------------------------------------------------------------------ loss

    def _hidden(self, wrapper, input_ids, attention_mask, mask):
        """The backbone's last hidden states at the response positions, (N, H), row-major: `base_model` only (the
        lookup TRL's fused head uses), run through the model's own wrapper so DDP/ZeRO-3/FSDP see a forward."""
        unwrapped = self.accelerator.unwrap_model(wrapper)

        def backbone(_model, ids, attn):
            hidden = causal_lm(_model).base_model(input_ids=ids, attention_mask=attn, use_cache=False)
            return hidden.last_hidden_state[:, :-1][mask]  # (N, H)

        return self._forward_redirection(wrapper, unwrapped, backbone, unwrapped, input_ids, attention_mask)

    def _head(self, model):
        """(weight, bias) of a model's LM head, FSDP2 DTensors gathered into plain tensors (as TRL does)."""
        head = causal_lm(self.accelerator.unwrap_model(model)).get_output_embeddings()
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        return weight, bias

    def _loss_in_forward(self, student, inputs, mask, seq_index, num_sequences):
        """Everything that touches the student's parameters, run inside its wrapper's forward."""
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        h_s = causal_lm(student).base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        h_s = h_s.last_hidden_state[:, :-1][mask]  # (N, H)
        with torch.no_grad():
            self.dpo_model.eval()
            self.other_model.eval()
            h_d = self._hidden(self.dpo_model, input_ids, attention_mask, mask)  # (N, H_d)
            h_o = self._hidden(self.other_model, input_ids, attention_mask, mask)  # (N, H_o)
        heads = [self._head(m) for m in (student, self.dpo_model, self.other_model)]
        device = heads[0][0].device

        @contextlib.contextmanager
        def gather():  # ZeRO-3: each model's head gathered in its own context, as TRL's chunked divergence does
            with contextlib.ExitStack() as stack:
                for head in heads:
                    stack.enter_context(maybe_gather_lm_head_ctx(*head))
                yield

        try:
            return aligndistil_loss(
                h_s.to(device),
                *heads[0],
                h_d.to(device),
                *heads[1],
                h_o.to(device),
                *heads[2],
                seq_index=seq_index.to(device),
                num_sequences=num_sequences,
                settings=self.settings,
                chunk_tokens=self.args.chunk_tokens,
                gather=gather,
            )
        except NonFiniteLogitsError as e:
            rows, cols = mask.nonzero(as_tuple=True)
            b, p = int(rows[e.index]), int(cols[e.index])
            name = self.dpo_name if e.model == "dpo" else self.other_name
            raise ValueError(
                f"non-finite logits from {name} at step {self.state.global_step}, row {int(inputs['row_index'][b])} "
                f"(batch row {b}), position {p} (the context predicting response token "
                f"{int(mask[b, :p].sum())}): check that model's weights and dtype"
            ) from None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        if self.args.on_policy:
            inputs = self._rollout(model, inputs)
        mask = inputs["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1): position p predicts a response token
        counts = mask.sum(dim=1)  # (B,)
        if (counts == 0).any():
            rows = inputs["row_index"][counts == 0].tolist()
            raise ValueError(f"rows {rows} of this batch have no response position (step {self.state.global_step})")
        seq_index = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]  # (N,)
        num_sequences = num_items_in_batch if num_items_in_batch is not None else self.count_items(inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        out = self._forward_redirection(
            model, unwrapped, self._loss_in_forward, unwrapped, inputs, mask, seq_index, num_sequences
        )
        loss = out.loss
        if num_items_in_batch is not None and self.normaliser_spans_processes():
            loss = loss * self.accelerator.num_processes  # DDP averages the processes' gradients
        self._log_metrics(mode, out, counts, inputs.get("_truncated"))
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the same loss on the eval rows (no labels to compare logits with)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _log_metrics(self, mode, out, counts, truncated) -> None:
        """`aligndistil/*` (spec section 3): per-token means over response positions, per-sequence means for
        `response_len` and `expected_reward`, the max of β_t; `gen_len`, `truncated_frac` on-policy."""
        n_tok, n_seq = counts.sum().float(), torch.tensor(float(counts.numel()), device=counts.device)
        sums = {
            "kl": (out.kl.sum(), n_tok),
            "alpha_mean": (out.alpha.sum(), n_tok),
            "distance_mean": (out.distance.sum(), n_tok),
            "beta_t_mean": (out.beta_t.sum(), n_tok),
            "kl_dpo": (out.kl_dpo.sum(), n_tok),
            "kl_other": (out.kl_other.sum(), n_tok),
            "response_len": (n_tok, n_seq),
            "expected_reward": (out.reward.sum(), n_seq),  # Σ_t per sequence, then the mean over sequences
        }
        if truncated is not None:
            sums["gen_len"] = (n_tok, n_seq)
            sums["truncated_frac"] = (truncated, n_seq)
        with torch.no_grad():
            device = out.kl.device
            pairs = torch.stack([torch.stack([s.float().to(device), c.float().to(device)]) for s, c in sums.values()])
            pairs = self.accelerator.gather(pairs.unsqueeze(0)).sum(0)  # (K, 2) summed over processes
            beta_max = out.beta_t.max() if out.beta_t.numel() else torch.tensor(0.0, device=device)
            beta_max = self.accelerator.gather(beta_max.reshape(1)).max()
            metrics = self._metrics[mode]
            for name, (total, count) in zip(sums, pairs.tolist()):
                if count > 0:
                    metrics[f"aligndistil/{name}"].append(total / count)
            metrics["aligndistil/beta_t_max"].append(beta_max.item())
