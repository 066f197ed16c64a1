"""Several processes on one job: which of them this is, its share of a list, and the results back in order.

accelerate does the work (`PartialState`, `split_between_processes`, `gather_object`). This module adds two things
it leaves to the caller: the position of a process's share in the whole list (so per-item seeds and outputs do
not depend on the number of processes), and the choice of the gloo backend on machines without a GPU.

Commands that work through a list of prompts use it like this; the merged list is the same with any number of
processes, and only the main process writes it:

    state = process_state()
    mine, start = split_for_process(prompts, state)
    local = [answer(p, seed=cfg.seed + start + i) for i, p in enumerate(mine)]
    results = gather_in_order(local, state)
    if state.is_main_process:
        write(results)

A command that must not lose work to a kill writes as it goes instead: each process appends to its own part file
(`part_path`), and the main process merges the parts into the output in the items' order.

The group of processes belongs to whoever created it. Each `dpokit` command runs inside `owned_process_group`,
which tears down the group the command created before the process exits (gloo's threads still alive at
interpreter exit abort the process). The library functions here never destroy a group: a notebook or a script
that calls them and started the group itself closes it with `close_process_group()`. A process launched as one of
several ends through `exit_process`, as `python -m dpokit` and the `dpokit` script do.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")


def needs_cpu_backend() -> bool:
    """Whether launched processes must talk over gloo on the CPU.

    Under `torchrun` or `accelerate launch --multi_gpu` on a machine without a GPU, accelerate finds no device
    backend and silently lets every process run alone as process 0 of 1, each writing the same files. Asking for
    the CPU makes them one job over gloo. `ACCELERATE_USE_CPU=1` asks for it explicitly.
    """
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    import torch  # here, so that `launch_rank` answers without loading torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6 knows CUDA, XPU, MPS, ... in one place
    has_device = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_device


# where launchers write the global rank: torchrun and `accelerate launch` (RANK), Open MPI, MPICH / Intel MPI
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def launch_rank() -> int:
    """This process's global rank as its launcher set it (0 when started alone), read from the environment only,
    so it can be asked on the way out of a failed run without starting a process group."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def process_state() -> Any:
    """accelerate's `PartialState` of this process (created on first use, shared with any `Accelerator`)."""
    from accelerate import PartialState

    return PartialState(cpu=needs_cpu_backend())


def split_for_process(items: Sequence[T], state: Any | None = None) -> tuple[list[T], int]:
    """This process's contiguous share of `items` and the index of its first item in `items`.

    Shares differ in size by at most one; a process may get none when there are fewer items than processes.
    """
    state = state or process_state()
    per_process, extra = divmod(len(items), state.num_processes)
    # the same arithmetic as accelerate's split_between_processes, whose share this is
    start = state.process_index * per_process + min(state.process_index, extra)
    with state.split_between_processes(list(items)) as mine:
        return list(mine), start


def gather_in_order(local_results: Sequence[T], state: Any | None = None) -> list[T]:
    """Every process's results concatenated in process order: the items' original order after
    `split_for_process`. Every process receives the whole list; only the main process should write it.

    Results travel between processes pickled (torch.distributed's object collectives): keep them plain data.
    """
    from accelerate.utils import gather_object

    state = state or process_state()
    if state.num_processes == 1:
        return list(local_results)
    return list(gather_object(list(local_results)))


def part_path(path: Path, rank: int) -> Path:
    """The file beside `path` that process `rank` appends its own rows to, for the main process to merge."""
    return path.with_name(f"{path.name}.rank{rank}.part")


def parts_of(path: Path) -> list[Path]:
    """The part files of `path` that are on disk (left by a killed run, or not merged yet), by rank."""
    return sorted(path.parent.glob(f"{path.name}.rank*.part"))


def _group_is_open() -> bool:
    torch = sys.modules.get("torch")  # a process that never loaded torch has no group to close
    return torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized()


def close_process_group() -> None:
    """Tear down this process's default group of processes, if one is open.

    Then collect garbage: objects of the finished run that sit in reference cycles would otherwise be freed during
    interpreter shutdown, where a C++ thread one of them owns aborts the process ("terminate called without an
    active exception", exit code -6), as `dpokit generate` under torchrun did in about one run in five.
    """
    if _group_is_open():
        sys.modules["torch"].distributed.destroy_process_group()
        gc.collect()


@contextmanager
def owned_process_group() -> Iterator[None]:
    """Close, on the way out (errors included), a group of processes created inside the block; leave alone one
    that was open before, since its creator owns it."""
    opened_before = _group_is_open()
    try:
        yield
    finally:
        if not opened_before:
            close_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with `code`. One process alone exits as usual. A process launched as one of several
    (WORLD_SIZE > 1), its group closed, flushes its output and logs and leaves without the interpreter's teardown:
    there, native threads of gloo and DeepSpeed whose Python owners are freed in no fixed order abort the process
    ("terminate called without an active exception", exit code -6) after its work is done and saved, as one
    DeepSpeed ZeRO-3 run under `accelerate launch` did, with its group closed, in 24 runs of the `distributed`
    tests.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    close_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stream has nothing left to write
    os._exit(code)
