"""`dpokit merge`: a LoRA adapter folded into its base, saved as a plain transformers model (safetensors plus
tokenizer), after checking that the merged model's logits match the unmerged model's on a probe conversation."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpokit.errors import RunStopped, UserError
from dpokit.outputs import ensure_writable
from dpokit.quantization import adapter_quantization, stored_quantization
from dpokit.runs import adapter_base_model
from dpokit.settings import resolve

# Largest |merged - unmerged| logit allowed, relative to the largest |logit|. Merging adds B @ A * scale into each
# weight in fp32, which reorders float additions only: measured differences are ~1e-6 of the logit scale, so
# 1e-4 leaves room while still catching a wrong scale, a missed module or a dtype loss (those are >= 1e-2).
MERGE_RELATIVE_TOLERANCE = 1e-4
PROBE_CONVERSATION = [
    {"role": "user", "content": "Give me three tips for writing clear code, and explain why each helps."},
    {"role": "assistant", "content": "1. Name things after what they mean. 2. Keep functions short. 3. Test."},
]
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class MergeCheck:
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "max_abs_logit": self.max_abs_logit,
            "tolerance": self.tolerance,
            "relative_tolerance": MERGE_RELATIVE_TOLERANCE,
            "passed": self.passed,
        }


@torch.no_grad()
def _probe_logits(model: Any, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**probe, use_cache=False).logits.float()


def merge_adapter(
    adapter_dir: str,
    output_dir: str,
    model_name: str | None = None,
    dtype: str = "auto",
    *,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
) -> MergeCheck:
    """Fold the adapter into its base (fp32), check logits on a probe conversation, save in `dtype` with the
    tokenizer the adapter was trained with (its own, else the base's; `chat_template` replaces its template).

    An adapter trained on a quantized base (QLoRA) is merged the same way: into the full-precision base, and checked
    against the adapter on that base; a base stored quantized is refused.

    The folder appears complete or not at all: the model is written to a temporary folder beside it and
    renamed into place.
    """
    from dpokit.models import load_adapter, load_model, load_tokenizer, resolve_model_path

    output = Path(output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"output folder {output} is not empty; give a new --output folder")
    ensure_writable(output.resolve().parent, "--output")
    base = model_name or adapter_base_model(adapter_dir)
    stored = stored_quantization(resolve_model_path(base))
    if stored is not None:
        raise UserError(
            f"base model `{base}` is stored quantized ({stored}); merge folds the adapter into full-precision "
            "weights only: pass the unquantized base with --model"
        )
    save_dtype = _save_dtype(resolve_model_path(base), dtype)
    has_own_tokenizer = (Path(adapter_dir) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter_dir if has_own_tokenizer else base, chat_template, trust_remote_code)
    model = load_adapter(load_model(base, dtype=torch.float32, trust_remote_code=trust_remote_code), adapter_dir)
    model.eval()
    text = tokenizer.apply_chat_template(PROBE_CONVERSATION, tokenize=False)
    probe = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    unmerged = _probe_logits(model, probe)
    merged_model = model.merge_and_unload()
    merged = _probe_logits(merged_model, probe)
    max_logit = unmerged.abs().max().item()
    check = MergeCheck((merged - unmerged).abs().max().item(), max_logit, MERGE_RELATIVE_TOLERANCE * max(1, max_logit))
    if not check.passed:
        raise RunStopped(
            f"merge stopped: merged logits differ from the adapter's by {check.max_abs_diff:.3g} "
            f"(> {check.tolerance}); nothing was written to {output}"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        merged_model.to(save_dtype).save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        provenance = {
            "adapter": str(Path(adapter_dir).resolve()),
            "base_model": base,
            "adapter_trained_on": adapter_quantization(adapter_dir),  # a QLoRA adapter's quantized base, or None
            "check": check.to_dict(),
        }
        (staging / "merge.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        os.chmod(staging, 0o755)
        if output.exists():
            output.rmdir()  # empty, checked above
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return check


def _save_dtype(base_path: str, dtype: str) -> torch.dtype:
    """`auto`: the dtype the base model was stored in, so a bf16 base stays bf16 after merging."""
    if dtype != "auto":
        return SAVE_DTYPES[dtype]
    from transformers import AutoConfig

    try:
        stored = getattr(AutoConfig.from_pretrained(base_path), "dtype", None)
    except (OSError, ValueError):
        stored = None
    if isinstance(stored, str):
        stored = SAVE_DTYPES.get(stored)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def run_merge(args: argparse.Namespace) -> int:
    view = resolve("merge", args, args.adapter)  # the base and chat template the adapter was trained with
    cfg = view.config
    check = merge_adapter(
        args.adapter,
        args.output,
        cfg.model_name_or_path,
        args.dtype,
        chat_template=cfg.chat_template,
        trust_remote_code=cfg.trust_remote_code,
    )
    view.announce("merge")
    print(
        f"merged into {args.output}: logits agree with the adapter's (max |diff| {check.max_abs_diff:.2e} <= "
        f"{check.tolerance:.2e})"
    )
    return 0
