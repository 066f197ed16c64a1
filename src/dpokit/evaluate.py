"""Did alignment work, by the numbers of training: implicit-reward accuracy on held-out pairs (`dpokit eval`).

On held-out pairs, the implicit DPO reward beta * (log pi(y|x) - log pi_ref(y|x)) (summed over response tokens, as
in training and RewardBench's DPO mode) of the chosen and the rejected response. A pair counts as accurate when the
chosen reward is strictly higher (an exact tie is not, as in TRL's `rewards/accuracies`). With `--adapter` the
reference is the same base with the adapter switched off; a fully fine-tuned `--model` needs its starting point
named with `--reference`, because nothing else can tell what it moved away from.

beta, the length limits and policy, the chat template, the system-message policy and the quantization are the
trained run's (`dpokit.settings`), so a pair is cut, dropped and scored as training did. The JSON goes to stdout
and, for an adapter in a run folder, to RUN_DIR/eval.json, where `dpokit report RUN_DIR` finds it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpokit import quantization
from dpokit.data import Pair
from dpokit.data.encode import EncodedPair
from dpokit.errors import UserError
from dpokit.inference import (
    load_for_inference,
)
from dpokit.models import autocast_for
from dpokit.outputs import ensure_writable, write_atomic
from dpokit.runs import RUN_CONFIG, adapter_base_model, run_folder_of
from dpokit.stats import bootstrap_mean_interval

EVAL_FILE = "eval.json"


# --- eval: implicit reward on held-out pairs ------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    beta: float = 0.1
    batch_size: int = 8
    max_length: int | None = 1024
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_start"
    bf16: bool | None = None  # None: where the hardware runs it fast
    system_message: str = "keep"  # as the run was trained (see dpokit.data.chat_template)


@torch.no_grad()
def sequence_logps_of_pairs(
    model: Any, tokenizer: Any, encoded: Sequence[EncodedPair], settings: EvalSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the chosen and of the rejected responses under `model`, in batches: (N,) each."""
    from dpokit.data.collate import collate
    from dpokit.logprobs import SequenceLogps

    scorer = SequenceLogps(model)
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(encoded), settings.batch_size):
        batch = collate(encoded[start : start + settings.batch_size], tokenizer.pad_token_id, padding_free=True)
        with autocast_for(device, settings.bf16):
            logps = scorer(batch.to(device))
        chosen.append(logps.chosen.float().cpu())
        rejected.append(logps.rejected.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def evaluate_pairs(
    model: Any, tokenizer: Any, pairs: Sequence[Pair], settings: EvalSettings, reference: Any | None = None
) -> dict[str, Any]:
    """Implicit-reward metrics of `model` against `reference` (None: `model` with its adapter switched off)."""
    from dpokit.data.encode import apply_length_policy, encode_pairs

    encoded = apply_length_policy(
        encode_pairs(tokenizer, pairs, system_message=settings.system_message),
        [p.origin for p in pairs],
        max_length=settings.max_length,
        max_prompt_length=settings.max_prompt_length,
        truncation_mode=settings.truncation_mode,
    )
    if not encoded.pairs:
        raise UserError(f"no pair is left after the length limits ({encoded.counts}); raise --max-length")
    policy_chosen_logps, policy_rejected_logps = sequence_logps_of_pairs(model, tokenizer, encoded.pairs, settings)
    if reference is None:
        with model.disable_adapter():
            reference_chosen_logps, reference_rejected_logps = sequence_logps_of_pairs(
                model, tokenizer, encoded.pairs, settings
            )
    else:
        reference_chosen_logps, reference_rejected_logps = sequence_logps_of_pairs(
            reference, tokenizer, encoded.pairs, settings
        )
    chosen_rewards = settings.beta * (policy_chosen_logps - reference_chosen_logps)  # (N,)
    rejected_rewards = settings.beta * (policy_rejected_logps - reference_rejected_logps)  # (N,)
    accurate = (chosen_rewards > rejected_rewards).double()
    low, high = bootstrap_mean_interval(accurate.tolist())
    return {
        "pairs": len(encoded.pairs),
        "beta": settings.beta,
        "rewards/accuracies": accurate.mean().item(),
        "accuracy_ci_low": low,
        "accuracy_ci_high": high,
        "rewards/margins": (chosen_rewards - rejected_rewards).double().mean().item(),
        "rewards/chosen": chosen_rewards.double().mean().item(),
        "rewards/rejected": rejected_rewards.double().mean().item(),
        "logps/chosen": policy_chosen_logps.double().mean().item(),
        "logps/rejected": policy_rejected_logps.double().mean().item(),
        "ref_logps/chosen": reference_chosen_logps.double().mean().item(),
        "ref_logps/rejected": reference_rejected_logps.double().mean().item(),
        "length_policy": encoded.counts,
    }


def _eval_settings(args: argparse.Namespace, run_dir: Path | None) -> tuple[EvalSettings, str]:
    """Settings from the flags, falling back to the run's own config.yaml, then to the training defaults."""
    from dpokit.config import DPOConfig, load_config

    run_config = load_config(run_dir / RUN_CONFIG) if run_dir is not None else DPOConfig()
    source = f"{run_dir / RUN_CONFIG}" if run_dir is not None else "defaults"
    beta = args.beta if args.beta is not None else run_config.beta
    if beta <= 0 or not math.isfinite(beta):
        raise UserError(f"--beta must be a positive number, got {beta}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    settings = EvalSettings(
        beta=beta,
        batch_size=args.batch_size,
        max_length=args.max_length if args.max_length is not None else run_config.max_length,
        max_prompt_length=run_config.max_prompt_length,
        truncation_mode=run_config.truncation_mode,
        bf16=args.bf16,
        system_message=run_config.system_message,
    )
    return settings, ("--beta" if args.beta is not None else source)


def run_eval(args: argparse.Namespace) -> int:
    from dpokit.data.load import load_pairs

    if args.adapter is None and args.reference is None:
        raise UserError(
            "eval needs a reference: give --adapter (the reference is --model with the adapter off) or, for a "
            "fully fine-tuned --model, --reference with the model it started from"
        )
    if args.adapter is not None and args.reference is not None:
        raise UserError("give either --adapter (reference: the base without it) or --reference, not both")
    run_dir = run_folder_of(args.adapter)
    settings, beta_source = _eval_settings(args, run_dir)
    output = Path(args.output) if args.output else (run_dir / EVAL_FILE if run_dir is not None else None)
    if output is not None:
        ensure_writable(output.resolve().parent, "--output")
    loaded = load_pairs(args.data, split=args.split, data_format=args.data_format, max_bad_rows=args.max_bad_rows)
    quant = quantization.from_flags(args)
    model, tokenizer = load_for_inference(args.model, args.adapter, quant)
    reference = None
    if args.reference is not None:
        reference, _ = load_for_inference(args.reference, None, quant)
    metrics = evaluate_pairs(model, tokenizer, loaded.pairs, settings, reference)
    result = {
        "data": loaded.source,
        "data_format": loaded.format,
        "bad_rows": len(loaded.bad_rows),
        "rows_dropped": loaded.counts,
        "model": args.model or adapter_base_model(args.adapter),
        "adapter": args.adapter,
        "reference": args.reference or "the model with the adapter switched off",
        "beta_from": beta_source,
        "quantization": quant.describe() if quant is not None else None,
        **metrics,
    }
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if output is not None:
        write_atomic(output, text + "\n")
        print(f"written to {output}", file=sys.stderr)
    return 0
