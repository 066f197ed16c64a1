"""What a device runs fast, and what a training run sets on its device before the first step.

bf16 autocast is chosen in `startup.precision` (`bf16_is_fast`); here the rest: TF32 matmuls for whatever
still runs in fp32 on an Ampere or later GPU (fp32 runs, the fp32 parts of a bf16 run), and a fresh peak-memory
counter, so `summary.json`'s `peak_memory_mb` is this run's even when one process trains several times.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TF32_FROM = (8, 0)  # compute capability of Ampere, the first GPUs with TF32 tensor cores


def wants_tf32(device: torch.device, capability: tuple[int, int] | None) -> bool:
    """Whether fp32 matmuls should run as TF32 on `device` of CUDA compute `capability`."""
    return device.type == "cuda" and capability is not None and tuple(capability) >= TF32_FROM


def prepare(device: torch.device) -> list[str]:
    """Set TF32 and reset the peak-memory counter on a CUDA `device`; returns what it set, for the log."""
    if device.type != "cuda":
        return []
    done = []
    if wants_tf32(device, torch.cuda.get_device_capability(device)):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        done.append("TF32 matmuls")
    torch.cuda.reset_peak_memory_stats(device)
    name = torch.cuda.get_device_name(device)
    log.info("device %s: %s", name, ", ".join(done) if done else "fp32 matmuls in full precision")
    return done


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast pays on this device: CUDA with bf16 support, or a CPU with AMX / AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "amx_bf16" in flags or "avx512_bf16" in flags
    return False


def use_bf16(device: torch.device, bf16: bool | None) -> bool:
    """`bf16` as the user asked, or, when they left it open (None), whether this device runs bf16 fast."""
    return bf16_is_fast(device) if bf16 is None else bf16


def autocast_for(device: torch.device, bf16: bool | None) -> AbstractContextManager:
    """bf16 autocast on `device` when `use_bf16` says so, else a context that changes nothing. For inference
    (sampling, scoring); training goes through accelerate's mixed precision."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(device, bf16))
