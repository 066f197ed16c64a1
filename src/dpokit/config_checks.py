"""Every config value checked against its meaning, once, when a config is built. Errors name the key."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING

from dpokit.config_values import coerce
from dpokit.errors import UserError

if TYPE_CHECKING:
    from dpokit.config import DPOConfig
    from dpokit.sft_config import SFTConfig


def _check_types(cfg: DPOConfig) -> None:
    """Each value of the declared type (a value set from Python too) and among the key's choices."""
    types_ = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if f.metadata["group"] == "sft":
            continue  # `validate_sft` checks those
        value = getattr(cfg, f.name)
        coerce(f.name, value, types_[f.name])
        choices = f.metadata["choices"]
        for item in value if isinstance(value, list) else [value]:
            if choices and item not in choices:
                raise UserError(f"config key `{f.name}` = {item!r}: must be one of {', '.join(choices)}")


def validate(cfg: DPOConfig) -> None:
    """Check every value against its meaning. Raises `UserError` naming the first bad key."""

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise UserError(f"config key `{key}` = {getattr(cfg, key)!r}: {why}")

    _check_types(cfg)
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        need(getattr(cfg, key) >= 1, key, "must be at least 1")
    for key in ("logging_steps", "lora_r", "lora_alpha", "logits_chunk_size"):
        need(getattr(cfg, key) >= 1, key, "must be at least 1")
    for key in ("eval_steps", "save_steps", "warmup_steps", "max_bad_rows", "max_nonfinite_steps"):
        need(getattr(cfg, key) >= 0, key, "must be 0 or more")
    need(cfg.learning_rate > 0, "learning_rate", "must be positive")
    need(
        cfg.num_train_epochs > 0 or cfg.max_steps > 0,
        "num_train_epochs",
        "must be positive (or set max_steps)",
    )
    need(
        cfg.max_steps == -1 or cfg.max_steps > 0,
        "max_steps",
        "must be positive, or -1 to use num_train_epochs",
    )
    need(0.0 <= cfg.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
    need(cfg.weight_decay >= 0, "weight_decay", "must be 0 or more")
    need(0.0 <= cfg.adam_beta1 < 1.0, "adam_beta1", "must be in [0, 1)")
    need(0.0 <= cfg.adam_beta2 < 1.0, "adam_beta2", "must be in [0, 1)")
    need(cfg.adam_epsilon > 0, "adam_epsilon", "must be positive")
    need(cfg.max_grad_norm >= 0, "max_grad_norm", "must be 0 (off) or positive")
    need(cfg.beta > 0, "beta", "must be positive")
    validate_losses(cfg, need)
    need(0.0 <= cfg.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
    need(cfg.min_score_margin >= 0, "min_score_margin", "must be 0 or more")
    need(cfg.max_length is None or cfg.max_length >= 2, "max_length", "must be at least 2 tokens")
    need(cfg.max_prompt_length is None or cfg.max_prompt_length >= 1, "max_prompt_length", "must be at least 1")
    if cfg.max_length is not None and cfg.max_prompt_length is not None:
        need(cfg.max_prompt_length < cfg.max_length, "max_prompt_length", "must be below max_length")
    need(cfg.save_total_limit is None or cfg.save_total_limit >= 1, "save_total_limit", "must be at least 1")
    need(
        cfg.precompute_ref_batch_size is None or cfg.precompute_ref_batch_size >= 1,
        "precompute_ref_batch_size",
        "must be at least 1",
    )
    need(bool(cfg.lora_target_modules), "lora_target_modules", "must name at least one module, or all-linear")
    need("none" not in cfg.report_to or cfg.report_to == ["none"], "report_to", "none stands alone")
    need(bool(cfg.model_name_or_path.strip()), "model_name_or_path", "must name a model")
    need(bool(cfg.output_dir.strip()), "output_dir", "must name a folder")
    need(not (cfg.resume and cfg.resume_from), "resume", "set either resume=true or resume_from=PATH, not both")
    need(
        not (cfg.overwrite_output_dir and (cfg.resume or cfg.resume_from)),
        "overwrite_output_dir",
        "cannot be combined with resume: one continues the run in output_dir, the other replaces it",
    )
    from dpokit.quantization import check_config

    check_config(cfg)
    from dpokit.data.formats import FORMATS

    need(
        cfg.data_format == "auto" or cfg.data_format in FORMATS,
        "data_format",
        f"must be auto or one of {', '.join(FORMATS)}",
    )
    if cfg.columns is not None:
        need(
            set(cfg.columns) <= {"prompt", "chosen", "rejected", "role", "content"}
            and {"chosen", "rejected"} <= set(cfg.columns),
            "columns",
            "maps chosen, rejected and optionally prompt to your column names (role, content: your message fields)",
        )


def validate_losses(cfg: DPOConfig, need: Callable[[bool, str, str], None]) -> None:
    """The loss keys, with TRL 1.16's restrictions."""
    from dpokit.losses import F_DIVERGENCE_LOSSES, LABEL_SMOOTHING_LOSSES, REFERENCE_FREE, SORTING_LOSSES

    types = set(cfg.loss_type)
    need(bool(cfg.loss_type), "loss_type", "must name at least one loss")
    need(len(types) == len(cfg.loss_type), "loss_type", "names a loss twice; give each once, with its weight")
    need(
        not types & REFERENCE_FREE or len(types) == 1,
        "loss_type",
        f"{' and '.join(sorted(types & REFERENCE_FREE))} logs its own rewards and cannot be combined; train it alone",
    )
    need(
        cfg.loss_weights is None or len(cfg.loss_weights) == len(cfg.loss_type),
        "loss_weights",
        f"needs one weight per loss_type entry ({len(cfg.loss_type)})",
    )
    need(0.0 <= cfg.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
    need(
        cfg.label_smoothing == 0.0 or bool(types & LABEL_SMOOTHING_LOSSES),
        "label_smoothing",
        f"is used only by loss_type {', '.join(sorted(LABEL_SMOOTHING_LOSSES))}; use one of them or leave it at 0",
    )
    need(
        "exo_pair" not in types or cfg.label_smoothing > 0,
        "label_smoothing",
        "must be above 0 for loss_type exo_pair (EXO's epsilon; the paper suggests 1e-3)",
    )
    need(cfg.discopop_tau > 0, "discopop_tau", "must be positive")
    need(cfg.orpo_alpha >= 0, "orpo_alpha", "must be 0 or more")
    need(cfg.ld_alpha is None or 0.0 <= cfg.ld_alpha <= 1.0, "ld_alpha", "must be in [0, 1], or empty for none")
    need(
        cfg.f_divergence_type == "reverse_kl" or types <= F_DIVERGENCE_LOSSES,
        "f_divergence_type",
        f"other than reverse_kl works only with loss_type {', '.join(sorted(F_DIVERGENCE_LOSSES))}",
    )
    need(
        not (cfg.use_weighting and types & SORTING_LOSSES),
        "use_weighting",
        "cannot weight aot or aot_unpaired: they sort the pairs, so per-pair weights would not follow them",
    )


def validate_sft(cfg: SFTConfig) -> None:
    """The SFT keys' own checks (the shared keys went through `validate`)."""
    types_ = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if f.metadata["group"] == "sft":
            coerce(f.name, getattr(cfg, f.name), types_[f.name])
    if cfg.sft_on is not None and cfg.sft_on != "chosen":
        raise UserError(f"config key `sft_on` = {cfg.sft_on!r}: must be chosen, or empty for SFT examples")
    if cfg.packing and cfg.max_length is None:
        raise UserError("config key `packing` = True: packing fills rows of max_length tokens; set max_length")
    if not cfg.dataset_text_field.strip():
        raise UserError("config key `dataset_text_field` is empty: name the column of plain-text examples")
    if cfg.sft_on is None and (cfg.data_format != "auto" or cfg.columns is not None):
        key = "data_format" if cfg.data_format != "auto" else "columns"
        raise UserError(f"config key `{key}` names a preference-pair layout; it needs sft_on=chosen")
