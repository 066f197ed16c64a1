"""The engine a run trains under, checked at start, and the few places where the engines differ.

The launcher picks the engine (`accelerate launch --use_deepspeed`, `--use_fsdp`, `--multi_gpu`, a config file,
or torchrun) and tells the processes through the ACCELERATE_USE_* variables. dpokit builds the `Accelerator` so
that the engine asked for is the engine that runs, stops with one line when it is not, and says which at start:

- DDP (accelerate's MULTI_GPU, or MULTI_CPU over gloo): every process holds the whole model.
- DeepSpeed ZeRO-2 / ZeRO-3: optimizer state and gradients (ZeRO-2), and the weights too (ZeRO-3), sharded over
  the processes. accelerate creates DeepSpeed's process group with the device's backend; on a machine without a
  GPU it must be told gloo, and `cpu=True` would drop the DeepSpeed plugin silently.
- FSDP2: torch's `fully_shard` on each decoder layer and then the root. On accelerators through accelerate's FSDP2
  plugin; accelerate enables FSDP only there, so without a GPU dpokit calls `fully_shard` itself under
  accelerate's MULTI_CPU state and lets accelerate prepare only the optimizer (or it would wrap the model in DDP).

Checkpoints hold whole tensors under every engine (the trainable weights by name, the optimizer state in torch's
own AdamW format), so a run saved under one engine and number of processes resumes under another. Every function
here that gathers or scatters is a collective: all processes call it, in the same order.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from dpokit.config import DPOConfig
from dpokit.distributed import needs_cpu_backend
from dpokit.errors import UserError

# where launchers write the number of processes they started: torchrun and accelerate, Open MPI, MPICH / Intel MPI
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def requested_engine() -> str | None:
    """The sharding engine the launcher asked for ("DEEPSPEED" or "FSDP"), or None for data parallelism."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "DEEPSPEED"
    if _flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    return None


def launched_processes() -> int:
    """How many processes the launcher says it started (1 when started alone)."""
    sizes = [int(os.environ[name]) for name in WORLD_SIZE_VARIABLES if os.environ.get(name, "").isdigit()]
    return max(sizes, default=1)


def has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6 knows CUDA, XPU, MPS, ... in one place
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


@dataclass(frozen=True)
class Engine:
    """What a run trains under: "single", "ddp", "deepspeed" (with its ZeRO stage) or "fsdp2"."""

    kind: str
    processes: int
    zero_stage: int = 0
    offload: str = "none"  # DeepSpeed's offload_optimizer device
    own_sharding: bool = False  # FSDP2 through `fully_shard` here, accelerate's plugin being for accelerators

    @property
    def gathers(self) -> bool:
        """Whether whole weights must be gathered from the engine (sharded, or DeepSpeed's fp32 master copy)."""
        return self.kind in ("deepspeed", "fsdp2")

    @property
    def shards_weights(self) -> bool:
        return self.kind == "fsdp2" or (self.kind == "deepspeed" and self.zero_stage == 3)

    def describe(self, acc: Any) -> str:
        names = {"single": "one process", "ddp": "DDP", "fsdp2": "FSDP2"}
        name = f"DeepSpeed ZeRO-{self.zero_stage}" if self.kind == "deepspeed" else names[self.kind]
        if self.offload != "none":
            name += f" with optimizer state offloaded to {self.offload}"
        if self.kind == "fsdp2":
            name += " (torch fully_shard; accelerate's plugin needs an accelerator)" if self.own_sharding else ""
        backend = getattr(acc.state, "backend", None)
        where = f"{self.processes} process{'es' if self.processes > 1 else ''} on {acc.device.type}"
        return f"engine: {name}, {where}" + (f" ({backend})" if backend else "") + f"; {acc.distributed_type.value}"


@contextmanager
def _without_env(name: str) -> Iterator[None]:
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def start(**accelerator_kwargs: Any) -> tuple[Any, Engine]:
    """The `Accelerator` for the engine the launcher asked for, checked before any data or model is touched."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    asked = requested_engine()
    if asked == "DEEPSPEED" and not has_accelerator():
        gloo = InitProcessGroupKwargs(backend="gloo")
        acc = Accelerator(cpu=_flag("ACCELERATE_USE_CPU"), kwargs_handlers=[gloo], **accelerator_kwargs)
    elif asked == "FSDP" and not has_accelerator():
        with _without_env("ACCELERATE_USE_FSDP"):  # accelerate's FSDP plugin would refuse the CPU
            acc = Accelerator(cpu=True, **accelerator_kwargs)
    else:
        acc = Accelerator(cpu=needs_cpu_backend(), **accelerator_kwargs)
    return acc, check_engine(acc, asked)


def check_engine(acc: Any, asked: str | None) -> Engine:
    """The engine `acc` runs, or one line on why it is not the one the launch asked for."""
    from accelerate.utils import DistributedType

    got = acc.distributed_type
    launched = launched_processes()
    if launched > acc.num_processes:
        raise UserError(
            f"{launched} processes were started but each runs alone ({got.value}, process {acc.process_index} of "
            f"{acc.num_processes}), which would train {launched} separate copies; start them with torchrun or "
            "accelerate launch, which connect them (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT)"
        )
    if asked == "DEEPSPEED" and got != DistributedType.DEEPSPEED:
        raise UserError(
            f"DeepSpeed was asked for (ACCELERATE_USE_DEEPSPEED=true) but accelerate runs {got.value}: "
            "ACCELERATE_USE_CPU=1 or --cpu drops DeepSpeed; launch without them (dpokit runs DeepSpeed over gloo "
            "on machines without a GPU)"
        )
    if got == DistributedType.DEEPSPEED:
        ds = acc.state.deepspeed_plugin
        offload = ds.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        return Engine("deepspeed", acc.num_processes, int(ds.zero_stage), str(offload))
    if got == DistributedType.FSDP:
        if acc.state.fsdp_plugin.fsdp_version != 2:
            raise UserError("accelerate is configured for FSDP version 1; dpokit trains under FSDP2: fsdp_version: 2")
        return Engine("fsdp2", acc.num_processes)
    if asked == "FSDP":
        if acc.num_processes < 2:
            raise UserError(
                "FSDP was asked for (ACCELERATE_USE_FSDP=true) on one process without a GPU; FSDP on CPU shards over "
                "several processes: launch with --num_processes 2 or more, or without --use_fsdp"
            )
        return Engine("fsdp2", acc.num_processes, own_sharding=True)
    return Engine("ddp" if acc.num_processes > 1 else "single", acc.num_processes)


# --- preparing -------------------------------------------------------------------------------------------------


def prepare(
    acc: Any, engine: Engine, cfg: DPOConfig, policy: Any, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[Any, Any, Any]:
    """The policy, optimizer and scheduler ready for the engine (the scheduler stays dpokit's under DeepSpeed:
    it sets the learning rate on the very optimizer that DeepSpeed steps)."""
    if engine.kind == "deepspeed":
        fill_deepspeed_config(acc, cfg)
        policy, optimizer = acc.prepare(policy, optimizer)
        if engine.zero_stage == 3:
            import deepspeed

            # the head's weight is read directly, not through the head's forward: gather it with the root's
            head = acc.unwrap_model(policy)._causal_lm().get_output_embeddings()
            deepspeed.zero.register_external_parameter(acc.unwrap_model(policy), head.weight)
        return policy, optimizer, scheduler
    if engine.own_sharding:
        shard_fsdp2(policy, acc.device.type, optimizer)
        optimizer, scheduler = acc.prepare(optimizer, scheduler)
        return policy, optimizer, scheduler
    return acc.prepare(policy, optimizer, scheduler)


# accelerate keeps one DeepSpeed config per process for every `Accelerator` in it: a second run in the process
# (the Python API, the tests) finds the values the first one wrote, and is checked against what the launch gave
_LAUNCH_VALUES: dict[int, dict[str, Any]] = {}


def fill_deepspeed_config(acc: Any, cfg: DPOConfig) -> None:
    """dpokit's batch, accumulation and clipping keys in DeepSpeed's config; a launch that sets them otherwise
    stops, as the two would disagree on what a step is."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.max_grad_norm,
        "train_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * acc.num_processes,
    }
    launched = _LAUNCH_VALUES.setdefault(id(ds), {key: ds.get(key, "auto") for key in wanted})
    defaults = {"gradient_accumulation_steps": 1}  # what accelerate writes when nothing was given
    for key, value in wanted.items():
        given = launched[key]
        if given not in ("auto", None, value, defaults.get(key)):
            raise UserError(
                f"the DeepSpeed config sets {key}={given} but dpokit's config gives {value}; remove it from the "
                "DeepSpeed config (or set it to auto): dpokit sets it from per_device_train_batch_size, "
                "gradient_accumulation_steps and max_grad_norm"
            )
        ds[key] = value


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The model's repeated blocks, by the class names transformers lists as never to be split."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_reference(acc: Any, engine: Engine, module: Any, policy: Any) -> None:
    """A frozen copy of the starting weights (full fine-tuning without precomputation) is sharded like the policy."""
    if engine.kind == "fsdp2" and module is not None and module is not policy:
        shard_fsdp2(module, acc.device.type)


def shard_fsdp2(policy: Any, device_type: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    """torch's `fully_shard` on each decoder layer and then the root, in place; the optimizer's parameters are
    replaced by their sharded versions."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # the policy returns views of its log-probs; dpokit never changes them in place, the case torch warns about
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    names = {id(p): name for name, p in policy.named_parameters()}
    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    layers = decoder_layers(policy._causal_lm())
    if not layers:
        raise UserError(f"FSDP2 found no decoder layers in {type(policy._causal_lm()).__name__}; launch with DDP")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    if optimizer is not None:
        sharded = dict(policy.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]


# --- backward and step -----------------------------------------------------------------------------------------


def backward(acc: Any, engine: Engine, policy: Any, loss: torch.Tensor, last: bool) -> None:
    """One pass's backward. DeepSpeed is told which pass ends the step, and not to divide by the accumulation
    count: dpokit's loss is already the global mean."""
    if engine.kind != "deepspeed":
        acc.backward(loss)
        return
    policy.set_gradient_accumulation_boundary(last)
    head = acc.unwrap_model(policy)._causal_lm().get_output_embeddings().weight
    if engine.zero_stage == 3 and head.requires_grad:
        import deepspeed

        # the head's backward reads the weight it saved in forward, which ZeRO-3 has released by then
        with deepspeed.zero.GatheredParameters([head]):
            policy.backward(loss, scale_wrt_gas=False)
        return
    policy.backward(loss, scale_wrt_gas=False)


def clip_and_norm(acc: Any, engine: Engine, policy: Any, params: list[torch.Tensor], max_norm: float) -> float:
    """The gradient norm before clipping, clipping to `max_norm` (0: off).

    DeepSpeed clips inside its own step, so under DeepSpeed this takes the step too; DeepSpeed skips a step whose
    gradient is not finite by itself, and its norm is then reported as NaN so dpokit counts the skipped step.
    """
    limit = max_norm if max_norm > 0 else math.inf
    if engine.kind == "deepspeed":
        policy.step()
        if getattr(policy.optimizer, "overflow", False):
            return math.nan
        norm = policy.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan
    if engine.kind == "fsdp2":
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads)
        total = total.full_tensor() if isinstance(total, DTensor) else total
        torch.nn.utils.clip_grads_with_norm_(params, limit, total)
        return float(total)
    return float(acc.clip_grad_norm_(params, limit))


# --- whole tensors for checkpoints and the final save ------------------------------------------------------------


def trainable_named(acc: Any, policy: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """The trained model's trainable parameters by name, in the optimizer's order."""
    return [(name, p) for name, p in acc.unwrap_model(policy).model.named_parameters() if p.requires_grad]


def whole_weights(acc: Any, engine: Engine, policy: Any, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """Whole fp32 (or training-dtype) CPU copies of the weights by name; complete on the main process."""
    model = acc.unwrap_model(policy).model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    if engine.kind == "deepspeed":
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in named:
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None:  # a frozen weight: DeepSpeed keeps no fp32 copy of it
                with deepspeed.zero.GatheredParameters([p]):
                    full = p.detach().clone()
            out[name] = full.detach().cpu().clone()
        return out
    if engine.kind == "fsdp2":
        return {name: _whole(p).cpu() for name, p in named}
    return {name: p.detach().cpu().contiguous() for name, p in named}


def _whole(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor().detach() if isinstance(t, DTensor) else t.detach()


def load_weights(acc: Any, engine: Engine, policy: Any, weights: dict[str, torch.Tensor]) -> None:
    """Whole weights by name into the (possibly sharded) trainable parameters."""
    with torch.no_grad():
        for name, p in trainable_named(acc, policy):
            value = weights[name]
            if engine.kind == "deepspeed":
                import deepspeed
                from deepspeed.utils import safe_set_full_fp32_param

                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # ZeRO-3: partitioned again on exit
                    p.data.copy_(value.to(p.dtype))
                safe_set_full_fp32_param(p, value.to(p.device, torch.float32))  # the optimizer's own fp32 copy
            elif engine.kind == "fsdp2":
                p.copy_(_shard_like(value, p))
            else:
                p.copy_(value)


def _shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements)
    return value


ADAM_STATE = ("exp_avg", "exp_avg_sq")


def optimizer_state(acc: Any, engine: Engine, policy: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer state in torch AdamW's format with whole tensors, parameters numbered in optimizer order."""
    if engine.kind == "deepspeed":
        from deepspeed.utils import safe_get_full_optimizer_state

        inner = client_optimizer(optimizer)
        steps = next((s["step"] for s in inner.state.values() if "step" in s), None)
        state: dict[int, dict[str, Any]] = {}
        for i, (_, p) in enumerate(trainable_named(acc, policy)):
            if steps is None:
                continue  # no step taken yet: AdamW creates its state at the first one
            values = {key: safe_get_full_optimizer_state(p, key) for key in ADAM_STATE}
            step = torch.as_tensor(steps, dtype=torch.float32).clone()  # DeepSpeed's CPU Adam counts in an int
            state[i] = {"step": step, **{k: v.detach().cpu() for k, v in values.items()}}
        count = len(trainable_named(acc, policy))
        return {"state": state, "param_groups": [{**_hyper(inner), "params": list(range(count))}]}
    saved = optimizer.state_dict()
    if engine.kind == "fsdp2":
        saved["state"] = {i: {k: _whole(v).cpu() for k, v in s.items()} for i, s in saved["state"].items()}
    return saved


def client_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch AdamW that DeepSpeed's ZeRO optimizer steps on its flat shards (through accelerate's wrapper)."""
    zero = getattr(optimizer, "optimizer", optimizer)
    return zero.optimizer


def _hyper(inner: torch.optim.Optimizer) -> dict[str, Any]:
    group = inner.param_groups[0]
    return {k: v for k, v in group.items() if k in inner.defaults or k == "initial_lr"}


def load_optimizer_state(acc: Any, engine: Engine, policy: Any, optimizer: Any, saved: dict[str, Any]) -> None:
    """`optimizer_state`'s output into the engine's optimizer, whatever engine and process count saved it."""
    if engine.kind != "deepspeed":
        if engine.kind == "fsdp2":
            params = [p for group in optimizer.param_groups for p in group["params"]]
            saved = {
                "param_groups": saved["param_groups"],
                "state": {
                    int(i): {k: _shard_like(v, params[int(i)]) if v.dim() else v for k, v in s.items()}
                    for i, s in saved["state"].items()
                },
            }
        optimizer.load_state_dict(saved)
        return
    from deepspeed.utils import safe_set_full_optimizer_state

    inner = client_optimizer(optimizer)
    group = saved["param_groups"][0]
    for g in inner.param_groups:
        g.update({k: v for k, v in group.items() if k != "params"})
    if not saved["state"]:
        return
    step = next(iter(saved["state"].values()))["step"]
    zero = getattr(optimizer, "optimizer", optimizer)
    # AdamW's state for DeepSpeed's flat fp32 shards (ZeRO-1/2 and ZeRO-3 name them differently), filled in below
    flats = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat
    for flat in flats:
        count = step.clone() if isinstance(inner, torch.optim.AdamW) else int(step)  # DeepSpeed's CPU Adam: an int
        inner.state[flat] = {"step": count, **{k: torch.zeros_like(flat) for k in ADAM_STATE}}
    for i, (_, p) in enumerate(trainable_named(acc, policy)):
        for key in ADAM_STATE:
            value = saved["state"][i][key]
            safe_set_full_optimizer_state(p, value.to(p.device, torch.float32), key)
