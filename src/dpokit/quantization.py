"""Quantized bases for QLoRA: the frozen base in 4-bit (NF4 or FP4) or 8-bit through bitsandbytes, LoRA on top.

The base is quantized while it loads (transformers' `BitsAndBytesConfig`) straight onto the training device, and
`peft.prepare_model_for_kbit_training` readies it for adapters; the reference is the same quantized base with the
adapter switched off. Adapters trained this way are plain LoRA adapters: they load onto the full-precision base with
plain peft, and `dpokit merge` folds them into full-precision weights, never into quantized ones.

bitsandbytes is the optional extra `qlora`; a short probe runs one tiny quantized layer forward and backward on the
device before anything else, so a broken install fails in a second rather than mid-run.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from dpokit.errors import UserError

EXTRA = "qlora"
INSTALL = f"pip install 'dpokit[{EXTRA}]'"
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Probe tolerance: the layer's output against x @ dequantize(W).T in fp32; both sides use the same 4-bit values,
# so only float summation order differs (measured ~1e-6); a kernel that computes garbage is off by O(1).
PROBE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Quantization:
    """How the base is stored: `bits` 4 or 8; the 4-bit data type and nested quantization; the compute dtype
    (`auto` until `resolve` picks one for a device)."""

    bits: int
    quant_type: str = "nf4"
    nested: bool = False
    compute_dtype: str = "auto"

    @property
    def key(self) -> str:
        """The config key or flag that asked for it, for messages."""
        return f"load_in_{self.bits}bit"

    def resolve(self, device: torch.device, bf16: bool | None) -> Quantization:
        """`auto` compute dtype: bf16 where the run computes in bf16 (the `bf16` setting, by default where the
        device runs bf16 fast: CUDA with bf16, CPUs with AMX or AVX512-BF16), fp32 otherwise."""
        if self.compute_dtype != "auto":
            return self
        from dpokit.devices import use_bf16

        dtype = "bfloat16" if use_bf16(device, bf16) else "float32"
        return Quantization(self.bits, self.quant_type, self.nested, dtype)

    def describe(self) -> dict[str, Any]:
        """For summary.json, the reference-cache key and messages."""
        if self.bits == 8:
            return {"bits": 8, "compute_dtype": self.compute_dtype}
        return {"bits": 4, "quant_type": self.quant_type, "nested": self.nested, "compute_dtype": self.compute_dtype}

    @property
    def label(self) -> str:
        if self.bits == 8:
            return "8-bit"
        return f"4-bit {self.quant_type}" + (" nested" if self.nested else "")


def from_config(cfg: Any) -> Quantization | None:
    """The quantization a training config asks for (TRL ModelConfig's keys), or None for a full-precision base."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    bits = 4 if cfg.load_in_4bit else 8
    return Quantization(bits, cfg.bnb_4bit_quant_type, cfg.use_bnb_nested_quant, cfg.bnb_4bit_compute_dtype)


def from_args(args: argparse.Namespace) -> Quantization | None:
    """The quantization of `--load-in-4bit` / `--load-in-8bit` (eval, compare, vibe, chat, generate), compute dtype
    unresolved."""
    if getattr(args, "load_in_4bit", False):
        return Quantization(4)
    if getattr(args, "load_in_8bit", False):
        return Quantization(8)
    return None


def for_run(cfg: Any, device: torch.device) -> Quantization | None:
    """The training config's quantization with its compute dtype resolved for `device`, or None."""
    quant = from_config(cfg)
    return quant.resolve(device, cfg.bf16) if quant is not None else None


def start(cfg: Any, device: torch.device) -> Quantization | None:
    """`for_run`, after the probe has shown that bitsandbytes runs on `device`."""
    quant = for_run(cfg, device)
    if quant is not None:
        probe(quant, device)
    return quant


def from_flags(args: argparse.Namespace) -> Quantization | None:
    """`from_args` resolved for the device this process runs on (its compute dtype following `--bf16`), after the
    probe: a missing or broken bitsandbytes fails before any model loads."""
    from dpokit.distributed import process_state

    quant = from_args(args)
    if quant is None:
        return None
    device = process_state().device
    quant = quant.resolve(device, getattr(args, "bf16", None))
    probe(quant, device)
    return quant


def check_config(cfg: Any) -> None:
    """The combinations a quantized base cannot train with, as one line naming the key."""
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise UserError("config keys `load_in_4bit` and `load_in_8bit` are both true; choose one")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and not cfg.use_peft:
        key = "load_in_4bit" if cfg.load_in_4bit else "load_in_8bit"
        raise UserError(
            f"config key `{key}`: quantized weights cannot be trained, only LoRA adapters on them; set use_peft=true "
            f"or {key}=false"
        )


def require_bitsandbytes(key: str) -> ModuleType:
    """bitsandbytes, or one line naming the extra that installs it."""
    # bitsandbytes reports at import, on CPUs with AVX512-BF16, that an optional hub kernel for its packed
    # inference layout is missing; dpokit does not use that layout (see `keep_training_layout`)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as e:
        raise UserError(f"{key} needs bitsandbytes, which is not installed: {INSTALL}") from e


def probe(quant: Quantization, device: torch.device) -> None:
    """One tiny quantized layer forward and backward on `device`, checked against the dequantized matmul."""
    bnb = require_bitsandbytes(quant.key)
    dtype = COMPUTE_DTYPES[quant.compute_dtype]
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            weight = torch.randn(64, 64)
            x = torch.randn(4, 64, device=device, requires_grad=True)
            if quant.bits == 4:
                layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type=quant.quant_type)
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant.quant_type)
                layer = layer.to(device)
                exact = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            else:
                layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
                layer = layer.to(device)
                exact = layer.weight.data.float() * layer.weight.SCB.float().unsqueeze(1) / 127
            layer.train()
            out = layer(x)
            out.float().square().sum().backward()
            expected = x.detach().float() @ exact.t()
    except Exception as e:  # any failure inside bitsandbytes means the install cannot run this device
        raise UserError(_broken(quant, device, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")) from e
    scale = max(1.0, float(expected.abs().max()))
    error = float((out.detach().float() - expected).abs().max())
    tolerance = PROBE_TOLERANCE if dtype == torch.float32 else 5e-2  # bf16/fp16 keep 8-11 bits
    if not (error <= tolerance * scale and x.grad is not None and bool(torch.isfinite(x.grad).all())):
        raise UserError(_broken(quant, device, f"a {quant.label} layer computes wrong numbers (off by {error:.3g})"))


def _broken(quant: Quantization, device: torch.device, detail: str) -> str:
    import bitsandbytes

    return (
        f"{quant.key}: bitsandbytes {bitsandbytes.__version__} cannot run on {device} ({detail}); reinstall it "
        f"with {INSTALL}, or set {quant.key}=false"
    )


def load_kwargs(quant: Quantization, device: torch.device) -> dict[str, Any]:
    """`from_pretrained` arguments that quantize the weights as they load, straight onto `device`."""
    require_bitsandbytes(quant.key)
    from transformers import BitsAndBytesConfig

    if quant.compute_dtype == "auto":
        raise ValueError("resolve the compute dtype before loading")  # a bug, not the user's
    if quant.bits == 8:
        config = BitsAndBytesConfig(load_in_8bit=True)  # its layers compute in their input's dtype
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.nested,
            bnb_4bit_compute_dtype=COMPUTE_DTYPES[quant.compute_dtype],
        )
    return {"quantization_config": config, "device_map": {"": device}}


def keep_training_layout(model: Any) -> None:
    """Keep every 4-bit layer in the layout training uses, also in eval mode.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight the first time it runs in eval mode without
    gradients, for a faster inference kernel. That kernel computes in bf16 whatever the compute dtype, has no
    backward (a training step after an evaluation would lose the gradient through the base), and fails on layers
    narrower than one quantization block. Without it, evaluation computes exactly what training computes.
    """
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    # 8-bit layers cast fp32 inputs to fp16 for their int8 matmul and warn on every call
    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast", category=UserWarning)


def prepare_for_training(model: Any, gradient_checkpointing: bool) -> Any:
    """peft's preparation of a quantized base: everything frozen, the few full-precision weights in fp32, and, with
    gradient checkpointing, inputs that carry gradients so checkpointed layers reach the adapters."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


@dataclass(frozen=True)
class WeightMemory:
    """Bytes of the base model's weights as stored, and as the same weights would take in fp32 and bf16."""

    stored: int
    fp32: int
    bf16: int

    def line(self, quant: Quantization | None) -> str:
        how = f"in {quant.label}" if quant is not None else "as stored"
        return (
            f"base weights: {_mib(self.stored)} {how} (unquantized: {_mib(self.fp32)} in fp32, {_mib(self.bf16)} in "
            "bf16)"
        )

    def to_dict(self) -> dict[str, float]:
        return {f"weights_{k}_mb": round(v / 2**20, 3) for k, v in vars(self).items()}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def weight_memory(model: Any) -> WeightMemory:
    """What the frozen base weights occupy (LoRA weights left out). A 4-bit weight is stored packed two values to a
    byte, with its scales in the quantization state; its unquantized size comes from the state's shape."""
    stored = elements = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        state = getattr(param, "quant_state", None)
        stored += param.numel() * param.element_size()
        if state is not None:
            stored += _quant_state_bytes(state)
            elements += int(torch.Size(state.shape).numel())
        else:
            elements += param.numel()
        scales = getattr(param, "SCB", None)  # 8-bit: one fp32 scale per output row
        if isinstance(scales, torch.Tensor):
            stored += scales.numel() * scales.element_size()
    return WeightMemory(stored, elements * 4, elements * 2)


def _quant_state_bytes(state: Any) -> int:
    tensors = [state.absmax, getattr(state, "code", None)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += [nested.absmax, getattr(nested, "code", None)]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def summary(cfg: Any, device: torch.device, model: Any) -> dict[str, Any] | None:
    """summary.json's `quantization`: how the base was stored and what its weights took."""
    quant = for_run(cfg, device)
    if quant is None:
        return None
    return {**quant.describe(), **weight_memory(model).to_dict()}


def stored_quantization(path: str) -> str | None:
    """The quantization method a model folder's weights are stored in (its config's `quantization_config`), if
    any: such weights are not full precision."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None  # the load that follows reports what is wrong with the folder
    stored = getattr(config, "quantization_config", None)
    if stored is None:
        return None
    method = stored.get("quant_method") if isinstance(stored, dict) else getattr(stored, "quant_method", None)
    return str(getattr(method, "value", method) or "quantized")


def adapter_quantization(adapter_dir: str) -> dict[str, Any] | None:
    """The quantized base an adapter was trained on, as `dpokit train` recorded it in dpokit.json."""
    import json
    from pathlib import Path

    path = Path(adapter_dir) / "dpokit.json"
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    value = recorded.get("quantization") if isinstance(recorded, dict) else None
    return value if isinstance(value, dict) else None
