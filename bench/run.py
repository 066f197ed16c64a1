"""The speed and memory benchmark: TRL's DPOTrainer against `dpokit train`, each run in its own process.

    make bench                                   # everything (about 40 minutes on 2 quiet cores)
    python bench/run.py --only trl-bf16,dpokit-bf16
    python bench/run.py --list

Steps: measure the matmul peak (for MFU), write the synthetic pair files, then run every configuration in `RUNS`
in its own subprocess (`run_trl.py` or `run_dpokit.py`), each from a cold start. Before each run the machine must
be quiet (other processes using under `--max-other-cores` cores); a run during which it was not is repeated up to
`--retries` times and flagged if it never was. The records go to `bench/results/latest.json`, the table to
`bench/results/latest.md` and to the terminal. dpokit runs are skipped, with a note, while `dpokit train` does not
exist yet.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import measure
import synthetic

RESULTS = measure.BENCH_DIR / "results"
REPO = measure.BENCH_DIR.parent


@dataclass(frozen=True)
class Run:
    """One configuration: which trainer, on which pairs, with which settings, compared with which TRL run."""

    name: str
    trainer: str  # "trl" or "dpokit"
    purpose: str
    max_length: int = 1024  # also picks the synthetic length profile
    batch_size: int = 4
    steps: int = 12
    warmup_steps: int = 2
    bf16: bool = True
    gradient_checkpointing: bool = False
    precompute_ref: bool = True
    settings: tuple[str, ...] = ()  # extra dpokit keys, key=value
    baseline: str | None = None  # the TRL run this dpokit run is measured against
    seed: int = 0  # of the synthetic pairs

    @property
    def pairs(self) -> int:
        """Each pair is trained on once, and the reference pass covers exactly the trained pairs."""
        return self.steps * self.batch_size

    def data_file(self, folder: Path) -> Path:
        return folder / f"pairs-{self.max_length}-seed{self.seed}-{self.pairs}.jsonl"


MAIN = {"max_length": 1024, "batch_size": 4, "steps": 8, "warmup_steps": 2}
FP32 = {"max_length": 1024, "batch_size": 4, "steps": 4, "warmup_steps": 1, "bf16": False}
LONG = {"max_length": 2048, "batch_size": 2, "steps": 3, "warmup_steps": 1}
ALL_SPEED_OFF = (
    "padding_free=false",
    "prefix_sharing=false",
    "segment_attention=false",
    "group_by_length=false",
    "logits_chunk_size=1000000",
)

RUNS = [
    # --- TRL: the baseline --------------------------------------------------------------------------------------
    Run("trl-bf16", "trl", "TRL fastest: bf16 autocast, precomputed reference, no checkpointing", **MAIN),
    Run("trl-fp32", "trl", "TRL in fp32: step-0 loss reference, fp32 speed", **FP32),
    Run("trl-bf16-gc", "trl", "TRL leaner: gradient checkpointing on", **MAIN, gradient_checkpointing=True),
    Run("trl-bf16-2048", "trl", "TRL fastest at max_length 2048 (memory)", **LONG),
    Run(
        "trl-bf16-gc-2048", "trl", "TRL leaner at max_length 2048: the memory bar", **LONG, gradient_checkpointing=True
    ),
    # --- dpokit: every speed switch at its default (on) ----------------------------------------------------------
    Run("dpokit-bf16", "dpokit", "dpokit defaults", **MAIN, baseline="trl-bf16"),
    Run("dpokit-fp32", "dpokit", "dpokit in fp32: step-0 loss vs TRL fp32", **FP32, baseline="trl-fp32"),
    Run("dpokit-bf16-2048", "dpokit", "dpokit at 2048 vs TRL's leaner memory", **LONG, baseline="trl-bf16-gc-2048"),
    # --- dpokit: each technique off, one at a time, then all of them ------------------------------------------------
    Run(
        "dpokit-no-padding-free",
        "dpokit",
        "padding_free off",
        **MAIN,
        settings=("padding_free=false",),
        baseline="trl-bf16",
    ),
    Run(
        "dpokit-no-prefix-sharing",
        "dpokit",
        "prefix_sharing off",
        **MAIN,
        settings=("prefix_sharing=false",),
        baseline="trl-bf16",
    ),
    Run(
        "dpokit-no-segment-attention",
        "dpokit",
        "packed rows through one masked attention pass",
        **MAIN,
        settings=("segment_attention=false",),
        baseline="trl-bf16",
    ),
    Run(
        "dpokit-no-group-by-length",
        "dpokit",
        "group_by_length off",
        **MAIN,
        settings=("group_by_length=false",),
        baseline="trl-bf16",
    ),
    Run(
        "dpokit-no-logits-chunks",
        "dpokit",
        "logits in one chunk",
        **MAIN,
        settings=("logits_chunk_size=1000000",),
        baseline="trl-bf16",
    ),
    Run(
        "dpokit-no-precompute", "dpokit", "reference run in the loop", **MAIN, precompute_ref=False, baseline="trl-bf16"
    ),
    Run(
        "dpokit-compile",
        "dpokit",
        "torch_compile on (opt-in: compiles in the first step)",
        **MAIN,
        settings=("torch_compile=true",),
        baseline="trl-bf16",
    ),
    Run(
        "dpokit-gc", "dpokit", "gradient checkpointing on", **MAIN, gradient_checkpointing=True, baseline="trl-bf16-gc"
    ),
    Run("dpokit-plain", "dpokit", "every speed switch off", **MAIN, settings=ALL_SPEED_OFF, baseline="trl-bf16"),
]


@dataclass
class Outcome:
    run: Run
    record: dict[str, Any] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None


# --- running ------------------------------------------------------------------------------------------------------


def child_env(src: str) -> dict[str, str]:
    """The environment of every runner: the benchmarked dpokit (`src`) first, offline hub, no progress bars."""
    paths = [str(Path(src).resolve()), str(measure.BENCH_DIR), os.environ.get("PYTHONPATH", "")]
    return os.environ | {
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def dpokit_train_exists(src: str) -> bool:
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('dpokit.train') else 1)"
    return subprocess.run([sys.executable, "-c", probe], env=child_env(src)).returncode == 0


def wait_until_quiet(max_other_cores: float, max_wait: float) -> float:
    """Poll until other processes use under `max_other_cores` cores; returns the last reading."""
    deadline = time.monotonic() + max_wait
    while True:
        other = measure.other_cores_now(3.0)
        if other <= max_other_cores or time.monotonic() >= deadline:
            return other
        print(f"  machine busy ({other:.2f} other cores); waiting", flush=True)
        time.sleep(15)


def runner_command(run: Run, data: Path, output: Path) -> list[str]:
    script = measure.BENCH_DIR / ("run_trl.py" if run.trainer == "trl" else "run_dpokit.py")
    command = [
        sys.executable,
        str(script),
        f"--name={run.name}",
        f"--data={data}",
        f"--max-length={run.max_length}",
        f"--batch-size={run.batch_size}",
        f"--steps={run.steps}",
        f"--warmup-steps={run.warmup_steps}",
        "--bf16" if run.bf16 else "--no-bf16",
        "--gradient-checkpointing" if run.gradient_checkpointing else "--no-gradient-checkpointing",
        "--precompute-ref" if run.precompute_ref else "--no-precompute-ref",
        f"--output={output}",
    ]
    return command + [f"--set={s}" for s in run.settings]


def run_watched(command: list[str], env: dict[str, str], log: Path, args: argparse.Namespace) -> int | None:
    """Run `command`; stop it early (returns None) if other processes keep over `--abort-cores` cores busy for
    `--abort-after` seconds, since a run that shares the cores is slowed many times over and will be repeated."""
    with open(log, "w", encoding="utf-8") as stderr:
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        busy_since: float | None = None
        while child.poll() is None:
            watch = measure.LoadWatch(include_children=True).start()
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            other, now = watch.stop()["other_cores"], time.monotonic()
            busy_since = (busy_since or now) if other > args.abort_cores else None
            if busy_since is not None and now - busy_since >= args.abort_after:
                os.killpg(child.pid, signal.SIGTERM)  # the runner and, for dpokit, its own child
                child.wait()
                return None
    return child.returncode


def execute(run: Run, data: Path, args: argparse.Namespace, scratch: Path) -> Outcome:
    """Run one configuration until it gets a quiet machine, or the attempts run out (then it is flagged)."""
    outcome = Outcome(run)
    for attempt in range(1, args.retries + 2):
        before = wait_until_quiet(args.max_other_cores, args.max_wait)
        output, log = scratch / f"{run.name}-{attempt}.json", scratch / f"{run.name}-{attempt}.log"
        print(f"[{run.name}] attempt {attempt} (other cores before: {before:.2f})", flush=True)
        started = time.time()
        returncode = run_watched(runner_command(run, data, output), child_env(args.src), log, args)
        process_wall = time.time() - started
        if returncode is None:
            outcome.attempts.append({"attempt": attempt, "other_cores_before": before, "aborted": "machine busy"})
            print(f"[{run.name}] stopped: the machine got busy; will repeat", flush=True)
            continue
        if returncode != 0 or not output.is_file():
            error = log.read_text(encoding="utf-8").strip()[-3000:]
            outcome.record = {"name": run.name, "error": error}
            print(f"[{run.name}] failed:\n{error}", flush=True)
            return outcome
        record = json.loads(output.read_text(encoding="utf-8"))
        record["process_wall_s"] = record.get("process_wall_s", round(process_wall, 3))
        other = record.get("load", {}).get("other_cores", 0.0)
        outcome.attempts.append({"attempt": attempt, "other_cores_before": before, "other_cores_during": other})
        outcome.record = record
        if "error" in record or other <= args.max_other_cores:
            break
        print(f"[{run.name}] machine was busy during the run ({other:.2f} other cores); repeating", flush=True)
    if not outcome.record:
        outcome.record = {"name": run.name, "error": f"no quiet machine in {len(outcome.attempts)} attempts"}
    outcome.record["contended"] = outcome.record.get("load", {}).get("other_cores", 0.0) > args.max_other_cores
    return outcome


def measure_peak(args: argparse.Namespace) -> dict[str, Any]:
    for attempt in range(args.retries + 1):
        wait_until_quiet(args.max_other_cores, args.max_wait)
        watch = measure.LoadWatch(include_children=True).start()
        out = subprocess.run(
            [sys.executable, str(measure.BENCH_DIR / "matmul_peak.py")],
            env=child_env(args.src),
            capture_output=True,
            text=True,
            check=True,
        )
        load = watch.stop()
        peak = json.loads(out.stdout) | {"load": load}
        if load["other_cores"] <= args.max_other_cores or attempt == args.retries:
            return peak
    raise AssertionError("unreachable")


# --- reporting ----------------------------------------------------------------------------------------------------


def add_derived(outcomes: list[Outcome], peak: dict[str, Any]) -> None:
    """MFU from the measured peak of the run's precision, and each dpokit run's ratios to its TRL baseline."""
    by_name = {o.run.name: o.record for o in outcomes}
    for o in outcomes:
        loop = o.record.get("train_loop", {})
        gflops = loop.get("achieved_gflops")
        precision = "bf16" if o.run.bf16 else "fp32"
        if gflops is not None:
            o.record["mfu"] = round(gflops / peak["peak"][f"{precision}_gflops"], 4)
            o.record["mfu_model_mix"] = round(gflops / peak["peak"][f"{precision}_model_mix_gflops"], 4)
        base = by_name.get(o.run.baseline or "")
        if not base or "train_loop" not in base or "train_loop" not in o.record:
            continue
        o.record["vs_baseline"] = {
            "baseline": o.run.baseline,
            "pairs_per_s": ratio(loop.get("pairs_per_s"), base["train_loop"].get("pairs_per_s")),
            "wall_time_speedup": ratio(base.get("wall_time_s"), o.record.get("wall_time_s")),
            "peak_rss": ratio(o.record["memory"]["peak_rss_mib"], base["memory"]["peak_rss_mib"]),
            "step0_loss_rel_diff": rel_diff(o.record["step0"].get("loss"), base["step0"].get("loss")),
        }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def rel_diff(a: float | None, b: float | None) -> float | None:
    return abs(a - b) / abs(b) if a is not None and b else None


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "–"
    return format(value, spec) if spec else str(value)


TABLE_HEADER = (
    "| run | precision | ckpt | pairs | pairs/s | tokens/s | peak RSS MiB | step-0 loss | wall s | MFU | "
    "x pairs/s | x wall | x RSS | other cores |"
)


def table_rows(outcomes: list[Outcome]) -> list[str]:
    rows = [TABLE_HEADER, "|" + "---|" * (TABLE_HEADER.count("|") - 1)]
    for o in outcomes:
        r, run = o.record, o.run
        if o.skipped:
            rows.append(f"| {run.name} | {o.skipped} |" + " |" * 12)
            continue
        if "error" in r:
            rows.append(f"| {run.name} | failed: {r['error'].splitlines()[-1][:80]} |" + " |" * 12)
            continue
        loop, vs = r.get("train_loop", {}), r.get("vs_baseline", {})
        loss = r.get("step0", {}).get("loss")
        rows.append(
            "| "
            + " | ".join(
                [
                    run.name + (" (busy)" if r.get("contended") else ""),
                    "bf16" if run.bf16 else "fp32",
                    "on" if run.gradient_checkpointing else "off",
                    str(run.pairs),
                    fmt(loop.get("pairs_per_s"), ".3f") + ("*" if "summary" in loop.get("basis", "") else ""),
                    fmt(loop.get("tokens_per_s"), ".0f"),
                    fmt(r.get("memory", {}).get("peak_rss_mib"), ".0f"),
                    fmt(loss, ".6f"),
                    fmt(r.get("wall_time_s"), ".1f"),
                    fmt(r.get("mfu") and 100 * r["mfu"], ".1f") + ("%" if r.get("mfu") else ""),
                    fmt(vs.get("pairs_per_s"), ".2f"),
                    fmt(vs.get("wall_time_speedup"), ".2f"),
                    fmt(vs.get("peak_rss"), ".2f"),
                    fmt(r.get("load", {}).get("other_cores"), ".2f"),
                ]
            )
            + " |"
        )
    return rows


def phase_rows(outcomes: list[Outcome]) -> list[str]:
    names = ["imports", "load", "tokenize", "model_hash", "reference_pass", "trainer_init_other", "train", "save"]
    rows = ["| run | " + " | ".join(names) + " | ref pairs/s |", "|" + "---|" * (len(names) + 2)]
    for o in outcomes:
        phases = o.record.get("phases_s")
        if not phases:
            continue
        ref = o.record.get("reference_pass", {}).get("pairs_per_s")
        rows.append(f"| {o.run.name} | " + " | ".join(fmt(phases.get(n), ".1f") for n in names) + f" | {fmt(ref)} |")
    return rows


def markdown(outcomes: list[Outcome], peak: dict[str, Any], hardware: dict[str, Any], started: str) -> str:
    v, pk = hardware["versions"], peak["peak"]
    lines = [
        "# DPO benchmark: dpokit vs TRL",
        "",
        f"Run {started} on {hardware['cpu']}, {hardware['cores']} cores ({', '.join(hardware['cpu_flags'])}), "
        f"{hardware['memory_gib']} GiB; torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, "
        f"peft {v['peft']}, accelerate {v['accelerate']}; commit {hardware.get('git_commit')}.",
        "",
        f"Matmul peak ({peak['threads']} threads, best of the model's shapes, the MFU denominator): fp32 "
        f"{pk['fp32_gflops']} GFLOP/s, bf16 {pk['bf16_gflops']} GFLOP/s; the model's mix of shapes: fp32 "
        f"{pk['fp32_model_mix_gflops']}, bf16 {pk['bf16_model_mix_gflops']} GFLOP/s; bf16 `F.linear` under "
        f"autocast (casts included): best {pk['bf16_autocast_linear_gflops']}, mix "
        f"{pk['bf16_autocast_linear_model_mix_gflops']} GFLOP/s. Other cores busy while measuring: "
        f"{peak['load']['other_cores']}.",
        "",
        "Model `builtin:smollm2-135m-instruct`, LoRA r=16 alpha=32 dropout 0.05 on all linear layers, beta 0.1, "
        "synthetic conversational pairs (`bench/synthetic.py`), each pair trained once; pairs/s and tokens/s over "
        "the steps after the warm-up; tokens are real (unpadded) tokens of prompt+chosen and prompt+rejected; "
        "wall is process start to adapter on disk; peak RSS is the process's `ru_maxrss`; `x` columns are dpokit "
        "over its TRL baseline (x RSS below 1 is less memory); `other cores` is the CPU other processes used "
        "during the run.",
        "",
        *table_rows(outcomes),
        "",
        "\\* from the trainer's summary.json, warm-up steps included: its metrics.jsonl has no per-step clock.",
        "",
        "Phases of the TRL runs (seconds):",
        "",
        *phase_rows(outcomes),
        "",
    ]
    return "\n".join(lines)


def load_previous(path: Path) -> dict[str, dict[str, Any]]:
    """The records of an earlier benchmark, by run name, so that `--only` keeps the runs it does not repeat."""
    if not path.is_file():
        return {}
    return {r["run"]["name"]: r for r in json.loads(path.read_text(encoding="utf-8"))["runs"]}


def merge_previous(outcomes: list[Outcome], previous: dict[str, dict[str, Any]]) -> list[Outcome]:
    fresh = {o.run.name: o for o in outcomes}
    merged = []
    for run in RUNS:
        if run.name in fresh:
            merged.append(fresh[run.name])
        elif run.name in previous and not previous[run.name]["skipped"]:
            old = previous[run.name]
            merged.append(Outcome(run, record=old["record"], attempts=old["attempts"]))
    return merged


def write_results(outcomes: list[Outcome], context: dict[str, Any], folder: Path) -> str:
    """latest.json and latest.md from this benchmark's runs so far and the earlier records of the others."""
    merged = merge_previous(outcomes, context["previous"])
    add_derived(merged, context["peak"])
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "started": context["started"],
        "hardware": context["hardware"],
        "matmul_peak": context["peak"],
        "runs": [
            {"run": asdict(o.run), "skipped": o.skipped, "attempts": o.attempts, "record": o.record} for o in merged
        ],
    }
    (folder / "latest.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    text = markdown(merged, context["peak"], context["hardware"], context["started"])
    (folder / "latest.md").write_text(text, encoding="utf-8")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    p.add_argument("--list", action="store_true", help="list the runs and exit")
    p.add_argument("--max-other-cores", type=float, default=0.25, help="busiest the machine may be (default 0.25)")
    p.add_argument("--max-wait", type=float, default=1800, help="seconds to wait for a quiet machine per run")
    p.add_argument("--retries", type=int, default=4, help="repeats of a run the machine was busy for")
    p.add_argument("--abort-cores", type=float, default=0.5, help="stop a run when others use more cores than this")
    p.add_argument("--abort-after", type=float, default=45, help="... for this many seconds in a row")
    p.add_argument("--results", default=str(RESULTS), help="folder for latest.json and latest.md")
    p.add_argument("--src", default=str(REPO / "src"), help="the `src` folder of the dpokit to benchmark")
    args = p.parse_args()
    if args.list:
        for run in RUNS:
            print(f"{run.name:28} {run.trainer:7} {run.pairs:3} pairs  {run.purpose}")
        return
    selected = [r for r in RUNS if args.only is None or r.name in args.only.split(",")]
    unknown = set(args.only.split(",")) - {r.name for r in RUNS} if args.only else set()
    if unknown:
        raise SystemExit(f"unknown run(s): {', '.join(sorted(unknown))}; --list shows them")

    results = Path(args.results)
    context: dict[str, Any] = {
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hardware": measure.hardware(),
        "previous": load_previous(results / "latest.json"),
    }
    print("measuring the matmul peak", flush=True)
    context["peak"] = measure_peak(args)
    have_dpokit = dpokit_train_exists(args.src)
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        scratch = Path(tmp)
        for run in selected:
            if run.trainer == "dpokit" and not have_dpokit:
                outcomes.append(Outcome(run, skipped="skipped: `dpokit train` does not exist yet"))
                continue
            data = run.data_file(scratch)
            if not data.is_file():
                synthetic.write_jsonl(synthetic.generate(run.pairs, run.seed, run.max_length), data)
            outcomes.append(execute(run, data, args, scratch))
            write_results(outcomes, context, results)  # after every run: a stopped benchmark keeps what it measured
    print(write_results(outcomes, context, results))


if __name__ == "__main__":
    if importlib.util.find_spec("psutil") is None:
        raise SystemExit("the benchmark needs psutil: pip install psutil")
    main()
