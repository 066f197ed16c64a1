"""This machine's matmul peak in fp32 and bf16 (GFLOP/s), the denominator of model FLOPs utilisation (MFU).

The shapes are the ones SmolLM2-135M runs (hidden 576, intermediate 1536, 3 key/value heads of 64, vocabulary
49152) with a few thousand tokens per batch, forward and backward (the transposed products), plus one large square
product for reference. Two summaries per precision: the peak (the best of the model's shapes) and the model mix
(the model's products in the proportions one LoRA training step runs them: what a perfect trainer would reach).
Each product runs on all threads torch uses, after a warm-up, repeatedly for at least `--seconds`; the best repeat
counts. Two bf16 numbers are kept: plain bf16 tensors (what the hardware does, via AMX) and `F.linear` on fp32
weights under `torch.autocast("cpu", bfloat16)` (what a trainer's forward actually runs, casts included).

    python bench/matmul_peak.py                # prints one JSON record
    python bench/matmul_peak.py --tokens 4096 --seconds 1
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

HIDDEN, INTERMEDIATE, KV_WIDTH, VOCAB_TILE = 576, 1536, 192, 8192


def shapes(tokens: int) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of `[M, K] @ [K, N]` for each product of a LoRA training step, and one large square product."""
    return {
        "q/o 576x576": (tokens, HIDDEN, HIDDEN),
        "k/v 576x192": (tokens, HIDDEN, KV_WIDTH),
        "k/v grad 192x576": (tokens, KV_WIDTH, HIDDEN),
        "up 576x1536": (tokens, HIDDEN, INTERMEDIATE),
        "down 1536x576": (tokens, INTERMEDIATE, HIDDEN),
        "lm_head 576x8192": (tokens, HIDDEN, VOCAB_TILE),
        "lm_head grad 8192x576": (tokens, VOCAB_TILE, HIDDEN),
        "square 2048": (2048, 2048, 2048),
    }


# Multiply-adds per token of each shape in one LoRA training step (frozen weights: forward, and backward for the
# activation gradients, whose products are the transposed shapes). Per layer: q and o forward and backward (4),
# k and v forward (2) and backward (2), gate and up forward with down backward (3 of 576x1536), down forward with
# gate and up backward (3 of 1536x576); the LM head on about half the tokens (the completion share), each way.
MODEL_MIX = {
    "q/o 576x576": 4 * HIDDEN * HIDDEN,
    "k/v 576x192": 2 * HIDDEN * KV_WIDTH,
    "k/v grad 192x576": 2 * HIDDEN * KV_WIDTH,
    "up 576x1536": 3 * HIDDEN * INTERMEDIATE,
    "down 1536x576": 3 * HIDDEN * INTERMEDIATE,
    "lm_head 576x8192": 0.5 * HIDDEN * 49152 / 30,  # per layer: the head runs once for 30 layers
    "lm_head grad 8192x576": 0.5 * HIDDEN * 49152 / 30,
}


def best_seconds(fn: Callable[[], object], seconds: float) -> float:
    """The fastest of repeated calls, after three warm-up calls, repeating for at least `seconds`."""
    for _ in range(3):
        fn()
    best = float("inf")
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gflops(m: int, k: int, n: int, seconds: float) -> float:
    return 2.0 * m * k * n / seconds / 1e9


def measure(tokens: int, seconds: float) -> dict[str, dict[str, float]]:
    """GFLOP/s of each shape in fp32, in plain bf16, and through `F.linear` under bf16 autocast."""
    results: dict[str, dict[str, float]] = {}
    for name, (m, k, n) in shapes(tokens).items():
        a32, b32 = torch.randn(m, k), torch.randn(k, n)
        a16, b16 = a32.bfloat16(), b32.bfloat16()
        weight = torch.randn(n, k)  # a Linear's weight is [out, in]

        def autocast_linear(a: torch.Tensor = a32, w: torch.Tensor = weight) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return F.linear(a, w)

        results[name] = {
            "fp32": round(gflops(m, k, n, best_seconds(lambda a=a32, b=b32: a @ b, seconds)), 1),
            "bf16": round(gflops(m, k, n, best_seconds(lambda a=a16, b=b16: a @ b, seconds)), 1),
            "bf16_autocast_linear": round(gflops(m, k, n, best_seconds(autocast_linear, seconds)), 1),
        }
    return results


def model_mix(per_shape: dict[str, dict[str, float]], precision: str) -> float:
    """GFLOP/s of the model's own products in their proportions: total FLOPs over the sum of each shape's time."""
    flops = sum(MODEL_MIX.values())
    seconds = sum(weight / per_shape[name][precision] for name, weight in MODEL_MIX.items())
    return round(flops / seconds, 1)


def summarise(per_shape: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per precision: the best of the model's shapes (the peak) and the model's mix of shapes."""
    model_shapes = [r for name, r in per_shape.items() if name in MODEL_MIX]
    summary = {}
    for precision in ("fp32", "bf16", "bf16_autocast_linear"):
        summary[f"{precision}_gflops"] = max(r[precision] for r in model_shapes)
        summary[f"{precision}_model_mix_gflops"] = model_mix(per_shape, precision)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="rows of each activation product (default 2048)")
    parser.add_argument("--seconds", type=float, default=0.5, help="time spent on each shape and precision")
    args = parser.parse_args()
    per_shape = measure(args.tokens, args.seconds)
    record = {"threads": torch.get_num_threads(), "tokens": args.tokens, "peak": summarise(per_shape)}
    record["per_shape"] = per_shape
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
