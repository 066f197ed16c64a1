"""The set-up pieces `train` and `sft` share: the accelerator and its precision, the policy, optimizer and
learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dpokit import attention, engines, quantization
from dpokit import checkpoint as ckpt
from dpokit.config import DPOConfig
from dpokit.devices import bf16_is_fast
from dpokit.errors import UserError
from dpokit.models import add_lora, cast_frozen_linears, compile_layers, disable_dropout, load_model

Autocast = Callable[[], AbstractContextManager[Any]]


def precision(cfg: DPOConfig) -> str:
    """The mixed precision: bf16 autocast when asked, or by default where the hardware runs it fast."""
    if cfg.bf16 is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return "bf16" if bf16_is_fast(device) else "no"
    return "bf16" if cfg.bf16 else "no"


def start(cfg: DPOConfig, **accelerator_kwargs: Any) -> tuple[Any, engines.Engine, Autocast]:
    """The accelerator, its engine, and the autocast context every forward pass runs in.

    accelerate keeps one mixed precision per process and refuses another one later (a second run in a notebook
    or the tests may change it). The sharding engines need accelerate's precision (DeepSpeed writes it into its
    config, FSDP into its policy) and get it; under one process or DDP accelerate stays in fp32 and dpokit
    autocasts itself, exactly as accelerate would (`torch.autocast` with bf16 around the forward pass).
    """
    wanted = precision(cfg)
    by_accelerate = engines.requested_engine() is not None
    acc, engine = engines.start(mixed_precision=wanted if by_accelerate else "no", **accelerator_kwargs)
    if by_accelerate:
        if acc.mixed_precision != wanted:  # DeepSpeed's config keeps the precision of the process's first run
            raise UserError(
                f"this process already ran accelerate's DeepSpeed engine in precision {acc.mixed_precision} and "
                f"accelerate keeps it; run bf16={cfg.bf16} in a new process"
            )
        return acc, engine, acc.autocast
    return acc, engine, partial(torch.autocast, acc.device.type, dtype=torch.bfloat16, enabled=wanted == "bf16")


def prepare_output(cfg: DPOConfig, acc: Any) -> Path | None:
    """The output folder checked (or a run in it to resume, whose checkpoint is returned), then the seed set."""
    from accelerate.utils import set_seed

    resume_from = ckpt.prepare_output_dir(
        Path(cfg.output_dir),
        resume=cfg.resume,
        resume_from=cfg.resume_from,
        overwrite=cfg.overwrite_output_dir,
        is_main=acc.is_main_process,
    )
    acc.wait_for_everyone()
    set_seed(cfg.seed)
    return resume_from


def load_policy(cfg: DPOConfig, device: torch.device, quant: quantization.Quantization | None = None) -> Any:
    """The model to train: LoRA on a frozen base (stored in bf16 under bf16 autocast, or quantized with `quant`),
    or every weight; dropout off as TRL does by default."""
    choice = attention.for_config(cfg, device)
    model = load_model(
        cfg.model_name_or_path,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=choice.load_as,
        quantization=quant,
        device=device,
    )
    model.config.use_cache = False
    attention.apply(choice, model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if quant is not None:
        model = quantization.prepare_for_training(model, cfg.gradient_checkpointing)
    if cfg.use_peft:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, cfg.seed)
        if precision(cfg) == "bf16":
            cast_frozen_linears(model, torch.bfloat16)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.torch_compile:
        compile_layers(model)
    return model.to(device).train()


def make_optimizer(cfg: DPOConfig, model: Any) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    return torch.optim.AdamW(trainable, cfg.learning_rate, betas, cfg.adam_epsilon, cfg.weight_decay)


def make_scheduler(cfg: DPOConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
