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
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dpokit import settings
from dpokit.config import DPOConfig
from dpokit.data import Pair
from dpokit.data.encode import EncodedPair
from dpokit.devices import autocast_for
from dpokit.distributed import process_state
from dpokit.errors import UserError
from dpokit.inference import load_for_inference, load_with_settings
from dpokit.losses import needs_reference
from dpokit.outputs import ensure_writable, write_atomic
from dpokit.runs import run_folder_of
from dpokit.stats import bootstrap_mean_interval

EVAL_FILE = "eval.json"


@torch.no_grad()
def sequence_logps_of_pairs(
    model: Any, tokenizer: Any, encoded: Sequence[EncodedPair], cfg: DPOConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the chosen and of the rejected responses under `model`, in batches: (N,) each."""
    from dpokit.data.collate import collate
    from dpokit.logprobs import SequenceLogps

    scorer = SequenceLogps(model)
    device = next(model.parameters()).device
    chosen, rejected = [], []
    batch_size = cfg.per_device_eval_batch_size
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], tokenizer.pad_token_id, padding_free=True)
        with autocast_for(device, cfg.bf16):
            logps = scorer(batch.to(device))
        chosen.append(logps.chosen.float().cpu())
        rejected.append(logps.rejected.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def evaluate_pairs(
    model: Any, tokenizer: Any, pairs: Sequence[Pair], cfg: DPOConfig, reference: Any | None = None
) -> dict[str, Any]:
    """Implicit-reward metrics of `model` against `reference` (None: `model` with its adapter switched off), the
    pairs encoded, cut and dropped by `cfg`'s length settings as training does."""
    from dpokit.data.encode import apply_length_policy, encode_pairs

    encoded = apply_length_policy(
        encode_pairs(tokenizer, pairs, system_message=cfg.system_message),
        [p.origin for p in pairs],
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        truncation_mode=cfg.truncation_mode,
        length_policy=cfg.length_policy,
    )
    if not encoded.pairs:
        raise UserError(f"no pair is left after the length limits ({encoded.counts}); raise --max-length")
    policy_chosen_logps, policy_rejected_logps = sequence_logps_of_pairs(model, tokenizer, encoded.pairs, cfg)
    if reference is None:
        with model.disable_adapter():
            reference_chosen_logps, reference_rejected_logps = sequence_logps_of_pairs(
                model, tokenizer, encoded.pairs, cfg
            )
    else:
        reference_chosen_logps, reference_rejected_logps = sequence_logps_of_pairs(
            reference, tokenizer, encoded.pairs, cfg
        )
    chosen_rewards = cfg.beta * (policy_chosen_logps - reference_chosen_logps)  # (N,)
    rejected_rewards = cfg.beta * (policy_rejected_logps - reference_rejected_logps)  # (N,)
    accurate = (chosen_rewards > rejected_rewards).double()
    low, high = bootstrap_mean_interval(accurate.tolist())
    return {
        "pairs": len(encoded.pairs),
        "beta": cfg.beta,
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


def run_eval(args: argparse.Namespace) -> int:
    from dpokit.console import make_console
    from dpokit.data.load import load_pairs, options_of

    if args.adapter is None and args.reference is None:
        raise UserError(
            "eval needs a reference: give --adapter (the reference is --model with the adapter off) or, for a "
            "fully fine-tuned --model, --reference with the model it started from"
        )
    if args.adapter is not None and args.reference is not None:
        raise UserError("give either --adapter (reference: the base without it) or --reference, not both")
    if args.adapter is None and args.model_name_or_path is None:
        raise UserError("give --model, the fully fine-tuned policy to score against --reference")
    view = settings.resolve("eval", args, args.adapter)
    cfg = view.config
    if not needs_reference(cfg.loss_type):
        make_console(process_state().is_main_process).print(
            f"note: loss_type {' '.join(cfg.loss_type)} trains without a reference; the rewards here are the "
            "implicit DPO reward beta * (log pi - log pi_ref) all the same"
        )
    run_dir = run_folder_of(args.adapter)
    output = Path(args.output) if args.output else (run_dir / EVAL_FILE if run_dir is not None else None)
    if output is not None:
        ensure_writable(output.resolve().parent, "--output")
    loaded = load_pairs(
        args.data,
        split=cfg.eval_split,
        data_config=cfg.eval_data_config,
        data_format=cfg.data_format,
        options=options_of(cfg),
        max_bad_rows=cfg.max_bad_rows,
    )
    model, tokenizer, quant = load_with_settings(cfg, args.adapter)
    view.announce("eval")  # once the inputs are known to be good, so that a mistake stays one line
    reference = None
    if args.reference is not None:
        reference, _ = load_for_inference(args.reference, None, quant, trust_remote_code=cfg.trust_remote_code)
    metrics = evaluate_pairs(model, tokenizer, loaded.pairs, cfg, reference)
    result = {
        "data": loaded.source,
        "data_format": loaded.format,
        "bad_rows": len(loaded.bad_rows),
        "rows_dropped": loaded.counts,
        "model": cfg.model_name_or_path,
        "adapter": args.adapter,
        "reference": args.reference or "the model with the adapter switched off",
        "loss_type": cfg.loss_type,
        "beta_from": view.sources["beta"],
        "settings_from": view.sources,
        "quantization": quant.describe() if quant is not None else None,
        **metrics,
    }
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if output is not None:
        write_atomic(output, text + "\n")
        print(f"written to {output}", file=sys.stderr)
    return 0
