"""What every benchmark runner measures the same way: memory, machine load, token counts, model FLOPs, hardware.

Imported by `run_trl.py`, `run_dpokit.py` and `run.py` (the scripts run from this folder, so it is on their path).
It imports neither torch nor transformers, so a runner can note its start time before the heavy imports.

Model FLOPs (for MFU) count the work of the plain DPO computation, whatever a trainer does to get there: each pair
is two unpadded sequences, prompt+chosen and prompt+rejected. Per sequence of T tokens, C of them completion tokens:

- linear layers: 2 * N_body FLOPs per token forward (N_body: the weights of the q, k, v, o, gate, up and down
  projections of every layer), and 2 * N_body backward for the activation gradients; frozen weights need no
  weight gradients, trained ones (full fine-tuning) need another 2 * N_body;
- LoRA: 2 * N_lora forward, 4 * N_lora backward (activation and weight gradients) per token;
- LM head: 2 * d * V per completion token forward and the same backward (only completion positions enter the
  loss; a trainer that projects prompt or padding positions does that work unpaid); tied to the embedding, which
  LoRA leaves frozen (no weight gradient) and full fine-tuning trains (another 2 * d * V);
- attention scores and values: 4 * L * d_attn * T^2 / 2 forward per sequence (two products, causal half),
  twice that backward; included.

Padding, recomputation under gradient checkpointing and work a trainer skips (prefix sharing runs the prompt once)
are not counted: MFU is a fixed amount of work over measured time, so the MFU ratio of two trainers equals their
speed ratio on the same pairs. The reference pass is not part of the training-loop MFU.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from dpokit.config import BUILTIN_MODEL  # noqa: F401  (re-exported for the bench scripts)

BENCH_DIR = Path(__file__).resolve().parent


# --- memory and load ----------------------------------------------------------------------------------------------


class RssSampler:
    """Peak resident memory of this process (and its children), sampled every `interval` seconds in a thread.

    `ru_maxrss` gives the whole-process peak too; the sampler adds the peak of each phase (`mark("train")`).
    """

    def __init__(self, interval: float = 0.02, include_children: bool = False) -> None:
        self.interval = interval
        self.include_children = include_children
        self.process = psutil.Process()
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        total = self.process.memory_info().rss
        if self.include_children:
            for child in self.process.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        value = self.rss()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), value)

    def mark(self, phase: str) -> None:
        self.sample()
        self.phase = phase

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def max_rss_bytes(children: bool = False) -> int:
    """The kernel's record of peak RSS (`ru_maxrss`, kilobytes on Linux) of this process or its largest child."""
    import resource

    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss * 1024


class LoadWatch:
    """How busy the machine was with other work while we ran: the CPU time every process but ours used.

    `other_cores` is the average number of cores other processes kept busy over the watched wall time; on a
    2-core machine anything above ~0.2 means the measurement was shared and should be repeated.
    """

    def __init__(self, include_children: bool = False) -> None:
        self.include_children = include_children
        self.process = psutil.Process()

    def _own_cpu(self) -> float:
        times = self.process.cpu_times()
        total = times.user + times.system
        if self.include_children:
            total += times.children_user + times.children_system
            for child in self.process.children(recursive=True):
                try:
                    ct = child.cpu_times()
                    total += ct.user + ct.system
                except psutil.Error:
                    pass
        return total

    @staticmethod
    def _busy_cpu() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)

    def start(self) -> LoadWatch:
        self.t0, self.busy0, self.own0 = time.monotonic(), self._busy_cpu(), self._own_cpu()
        self.loadavg0 = os.getloadavg()
        return self

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        other = (self._busy_cpu() - self.busy0) - (self._own_cpu() - self.own0)
        return {
            "other_cores": round(max(other, 0.0) / wall, 3) if wall > 0 else 0.0,
            "loadavg_start": [round(x, 2) for x in self.loadavg0],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        }


def other_cores_now(seconds: float = 2.0) -> float:
    """Cores kept busy by processes other than this one over the next `seconds`."""
    watch = LoadWatch().start()
    time.sleep(seconds)
    return watch.stop()["other_cores"]


# --- tokens -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairLengths:
    """Token counts of one pair after the length policy: the prompt and each response."""

    prompt: int
    chosen: int
    rejected: int

    def truncated(self, max_length: int | None) -> PairLengths:
        """keep_start: each prompt+response sequence is cut to `max_length`, the prompt kept whole (TRL and dpokit)."""
        if max_length is None:
            return self
        room = max(max_length - self.prompt, 0)
        return PairLengths(self.prompt, min(self.chosen, room), min(self.rejected, room))

    @property
    def tokens(self) -> int:
        """Real tokens of the unshared layout: the prompt once with each response."""
        return 2 * self.prompt + self.chosen + self.rejected


def token_stats(pairs: Sequence[PairLengths], batch_size: int) -> dict[str, Any]:
    """Real tokens, and the padded tokens of batches of `batch_size` pairs padded to their longest row (TRL's way)."""
    real = sum(p.tokens for p in pairs)
    padded = 0
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        longest = max(max(p.prompt + p.chosen, p.prompt + p.rejected) for p in batch)
        padded += 2 * len(batch) * longest
    return {
        "pairs": len(pairs),
        "tokens": real,
        "completion_tokens": sum(p.chosen + p.rejected for p in pairs),
        "padded_tokens": padded,
        "padding_share": round(1 - real / padded, 4) if padded else 0.0,
        "tokens_per_pair": round(real / len(pairs), 1) if pairs else 0.0,
    }


# --- FLOPs --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(
            layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab=config["vocab_size"],
        )

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of every projection in one decoder layer (Llama layout)."""
        d, q, kv, ff = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(d, q), (d, kv), (d, kv), (q, d), (d, ff), (d, ff), (ff, d)]

    @property
    def body_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linear_shapes())

    def lora_params(self, rank: int) -> int:
        """Adapter weights of LoRA on every projection (`all-linear`, which leaves the LM head out)."""
        return self.layers * sum(rank * (i + o) for i, o in self.linear_shapes())


def training_flops(
    pairs: Sequence[PairLengths], shape: ModelShape, lora_rank: int | None, backward: bool = True
) -> float:
    """Model FLOPs of one forward (and backward) of the policy over `pairs`, as defined in this module's docstring."""
    body, head = shape.body_params, shape.hidden * shape.vocab
    lora = shape.lora_params(lora_rank) if lora_rank else 0
    attn_width = shape.heads * shape.head_dim
    full = lora_rank is None  # full fine-tuning also needs the weight gradients of the body and the (tied) head
    linear_factor = (4 + (2 if full else 0)) if backward else 2
    lora_factor = 6 if backward else 2
    head_factor = (4 + (2 if full else 0)) if backward else 2
    attn_factor = 3 if backward else 1
    total = 0.0
    for p in pairs:
        for length, completion in ((p.prompt + p.chosen, p.chosen), (p.prompt + p.rejected, p.rejected)):
            total += length * (linear_factor * body + lora_factor * lora)
            total += completion * head_factor * head
            total += attn_factor * 4 * shape.layers * attn_width * length * length / 2
    return total


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))


# --- hardware -----------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512f", "avx2")))
    except OSError:
        pass
    return []


def hardware() -> dict[str, Any]:
    """The machine and library versions a result belongs to."""
    versions = {}
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # noqa: BLE001 - a missing package is reported as such
            versions[package] = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": git_commit(),
    }


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_record(record: dict[str, Any], path: str | None) -> None:
    """Print the record as one JSON line, and write it to `path` too when given."""
    text = json.dumps(record, sort_keys=False)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
