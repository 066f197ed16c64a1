"""FlexAttention on CPU against the CPU path (segment attention) and one dense masked SDPA pass: forward only.

torch 2.13 has no FlexAttention backward on CPU, so only no-grad passes (the reference pass, evaluation) could use
it there. This times the backbone + chunked head of `builtin:smollm2-135m-instruct` over batches of the CPU
benchmark's pairs (packed, prefix-shared, one row), after one warm-up pass per batch (FlexAttention compiles then).

    python bench/flex_cpu.py --batches 4 --batch-size 4 --bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent / "src"), str(BENCH)]

import synthetic  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()

    import torch

    from dpokit import attention, flex
    from dpokit.config import BUILTIN_MODEL
    from dpokit.data.collate import collate
    from dpokit.data.encode import apply_length_policy, encode_pairs
    from dpokit.data.rows import as_text_pair
    from dpokit.logprobs import SequenceLogps
    from dpokit.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(BUILTIN_MODEL)
    rows = synthetic.generate(args.batches * args.batch_size, seed=0, max_length=1024)
    pairs = encode_pairs(tokenizer, [as_text_pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows])
    pairs = apply_length_policy(pairs, [""] * len(pairs), max_length=1024, max_prompt_length=None).pairs
    batches = [
        collate(
            pairs[i : i + args.batch_size], tokenizer.pad_token_id, padding_free=True, prefix_sharing=True, one_row=True
        )  # fmt: skip
        for i in range(0, len(pairs), args.batch_size)
    ]
    results = {}
    for name, switch in {
        "segment attention": attention.enable,
        "flex_attention": flex.enable,
        "dense mask": None,
    }.items():
        model = load_model(BUILTIN_MODEL).eval()
        if switch is not None:
            assert switch(model)
        policy = SequenceLogps(model)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            t0 = time.perf_counter()
            for batch in batches:
                policy(batch)  # warm-up: FlexAttention compiles each new shape here
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            for batch in batches:
                policy(batch)
            seconds = time.perf_counter() - t0
        tokens = sum(b.num_tokens for b in batches)
        results[name] = {"forward_s": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                         "first_pass_s": round(warm, 2)}  # fmt: skip
        print(name, results[name], file=sys.stderr, flush=True)
    print(json.dumps({"bf16": args.bf16, "batches": len(batches), "results": results}, indent=2))


if __name__ == "__main__":
    main()
