"""Several processes: two CPU processes over gloo, started by `accelerate launch` or torchrun, against one process.

One launch runs three trainings (LoRA with the precomputed reference, LoRA with the adapter-off reference and
gradient accumulation, full fine-tuning with a frozen copy), because starting two processes costs more than the
trainings themselves. The one-process runs it is compared with run in the test process.

Tolerance: everything is fp32 (bf16=false) and the two layouts do the same arithmetic except the order of the
gradient all-reduce and how pairs are batched into forward passes. Every logged value (loss, grad_norm, rewards,
log-probs of about -200) agrees to 1e-5. Weights agree to 1e-6 after one step and to 1e-5 after four: AdamW
divides each gradient entry by its own running scale, so last-bit differences in an entry near zero move that
weight by up to a small fraction of the learning rate (1e-3 here). As AdamW hides a wrong overall gradient scale,
the logged grad_norm is what pins the gradient's size.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import conversational_rows, write_jsonl
from dpokit.distributed import gather_in_order, process_state, split_for_process
from dpokit.errors import UserError
from test_train import SRC, adapter_weights, metrics, run_train, settings

pytestmark = pytest.mark.distributed

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
STEP_ATOL = 1e-6  # weights after one optimizer step
WEIGHTS_ATOL = 1e-5  # after several
METRICS_ABS = 1e-5

TRAIN_DRIVER = """
import json, sys
from dpokit.cli import main
from dpokit.config import load_config
from dpokit.distributed import exit_process
from dpokit.train import train

*first, last = json.loads(sys.argv[1])
for keys in first:
    train(load_config(None, keys))  # the Python API: several runs in the same processes
exit_process(main(["train", *last]))  # the command closes the group of processes; the process ends as dpokit's
"""

HELPER_DRIVER = """
import json, sys
from pathlib import Path
from dpokit.distributed import exit_process, gather_in_order, process_state, split_for_process

state = process_state()
found = {}
for n in (0, 1, 5, 6):
    items = [f"prompt-{i}" for i in range(n)]
    mine, start = split_for_process(items, state)
    answers = [{"index": start + i, "prompt": p, "rank": state.process_index} for i, p in enumerate(mine)]
    found[n] = {"mine": mine, "start": start, "merged": gather_in_order(answers, state)}
record = {"rank": state.process_index, "processes": state.num_processes, "found": found}
Path(sys.argv[1], f"rank-{state.process_index}.json").write_text(json.dumps(record))
exit_process(0)  # the script created the group: it closes it and ends as a launched dpokit process does
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "DPOKIT_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def common(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return settings(model_dir, data, out, "warmup_ratio=0", *extra)


def lora_keys(model_dir: Path, root: Path, out: Path, per_device: int) -> list[str]:
    return common(
        model_dir,
        root / "pairs.jsonl",
        out,
        f"per_device_train_batch_size={per_device}",
        f"eval_data={root / 'eval.jsonl'}",
        "per_device_eval_batch_size=2",
        "max_steps=4",
        "save_steps=1",
    )


def adapter_off_keys(model_dir: Path, root: Path, out: Path) -> list[str]:
    return common(
        model_dir,
        root / "pairs.jsonl",
        out,
        "precompute_ref_log_probs=false",
        "per_device_train_batch_size=1",
        "gradient_accumulation_steps=2",
        "max_steps=4",
    )


def full_keys(model_dir: Path, root: Path, out: Path, per_device: int) -> list[str]:
    return common(
        model_dir,
        root / "pairs.jsonl",
        out,
        "use_peft=false",
        "precompute_ref_log_probs=false",
        "learning_rate=1e-4",
        f"per_device_train_batch_size={per_device}",
        "max_steps=2",
    )


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`root/two/*`: runs on 2 processes x 2 pairs; `root/one/*`: the same runs on 1 process x 4 pairs."""
    root = tmp_path_factory.mktemp("distributed")
    write_jsonl(root / "pairs.jsonl", conversational_rows(24))
    write_jsonl(root / "eval.jsonl", conversational_rows(7, seed=1))  # odd: one process gets a zero-weight pad
    two = root / "two"
    plan = [
        lora_keys(tiny_model_dir, root, two / "lora", per_device=2),
        adapter_off_keys(tiny_model_dir, root, two / "adapter-off"),
        full_keys(tiny_model_dir, root, two / "full", per_device=2),
    ]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "multi-gpu.yaml")]
    launcher += ["--num_processes", "2", "--main_process_port", str(free_port())]
    done = subprocess.run(
        [*launcher, str(write_script(root / "driver.py", TRAIN_DRIVER)), json.dumps(plan)],
        env=launch_env(root / "cache-two"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (root / "two.log").write_text(done.stderr)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPOKIT_CACHE", str(root / "cache-one"))
        run_train(*lora_keys(tiny_model_dir, root, root / "one" / "lora", per_device=4))
        run_train(*full_keys(tiny_model_dir, root, root / "one" / "full", per_device=4))
    return root


def write_script(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def assert_same_weights(
    expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], atol: float = WEIGHTS_ATOL
) -> None:
    assert expected.keys() == got.keys()
    worst = max(float((value - got[key]).abs().max()) for key, value in expected.items())
    print(f"largest weight difference {worst:.2e}")
    assert worst <= atol


TIMING_KEYS = {"train_seconds"}


def assert_same_rows(expected: list[dict], got: list[dict]) -> None:
    """Same steps, same keys and the same values; wall-clock time is the one thing allowed to differ."""
    assert [r["step"] for r in expected] == [r["step"] for r in got]
    for a, b in zip(expected, got, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - TIMING_KEYS:
            assert b[key] == pytest.approx(a[key], abs=METRICS_ABS, rel=1e-6), (a["step"], key)


@pytest.mark.slow
def test_one_step_on_two_processes_equals_one_process(runs: Path) -> None:
    """2 processes x 2 pairs and 1 process x 4 pairs: the same loss and the same weights after one step."""
    one, two = runs / "one" / "lora", runs / "two" / "lora"
    assert metrics(two)[0]["loss"] == pytest.approx(metrics(one)[0]["loss"], rel=1e-6)
    after_one_step = [load_file(str(run / "checkpoints" / "step-1" / "trainable.safetensors")) for run in (one, two)]
    assert_same_weights(*after_one_step, atol=STEP_ATOL)
    assert sum(float(v.abs().sum()) for k, v in after_one_step[1].items() if "lora_B" in k) > 0  # the step moved


@pytest.mark.slow
def test_two_process_run_writes_one_run_with_averaged_metrics(runs: Path) -> None:
    one, two = runs / "one" / "lora", runs / "two" / "lora"
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()}
    assert [p.name for p in sorted((two / "checkpoints").iterdir())] == ["step-1", "step-2", "step-3"]
    assert len(list((two / "tensorboard").rglob("events.out.tfevents.*"))) == 1
    assert_same_weights(adapter_weights(one), adapter_weights(two))
    rows = metrics(two)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4]  # one row per step: only the main process writes
    assert_same_rows(metrics(one), rows)  # every value averaged over both processes' pairs, eval rows included
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch_size"] == 4


@pytest.mark.slow
def test_reference_cache_from_two_shards_equals_one_process(runs: Path) -> None:
    """Each process computes its own training batches; gathered, the tables equal one process's (24 train and 7
    eval pairs, told apart by size). The keys differ: they name the batches, which differ with the process count."""
    tables = {}
    for name in ("cache-one", "cache-two"):
        files = sorted((runs / name / "ref-logps").glob("*.safetensors"))
        assert len(files) == 2  # train and eval
        tables[name] = {len(t): t for t in (load_file(str(f))["logps"] for f in files)}
    assert sorted(tables["cache-one"]) == sorted(tables["cache-two"]) == [7, 24]
    for rows, table in tables["cache-one"].items():
        # batches of other sizes change the last bits of sums of about -200
        assert torch.allclose(table, tables["cache-two"][rows], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_adapter_off_reference_with_accumulation_under_ddp(runs: Path) -> None:
    """The LoRA reference with adapters switched off inside DDP, and no_sync passes, end where one process does."""
    assert_same_weights(adapter_weights(runs / "one" / "lora"), adapter_weights(runs / "two" / "adapter-off"))


@pytest.mark.slow
def test_full_finetuning_under_ddp_through_the_command(runs: Path) -> None:
    one, two = runs / "one" / "full", runs / "two" / "full"
    assert_same_weights(
        load_file(str(one / "model" / "model.safetensors")), load_file(str(two / "model" / "model.safetensors"))
    )
    assert_same_rows(metrics(one), metrics(two))
    log = (runs / "two.log").read_text()
    assert log.count("pairs.jsonl: 24 pairs from 24 rows") == 1  # the command logs its data once, not per process


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_on_one(
    tiny_model_dir: Path, runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saved by 2 processes x 2 pairs at step 2, finished by 1 process x 2 pairs x 2 passes: the same weights."""
    checkpoint = runs / "two" / "lora" / "checkpoints" / "step-2"
    keys = lora_keys(tiny_model_dir, runs, tmp_path / "resumed", per_device=2)
    monkeypatch.setenv("DPOKIT_CACHE", str(runs / "cache-one"))
    with pytest.raises(UserError, match="global batch of 4 pairs, this run has 2"):
        run_train(*keys, f"resume_from={checkpoint}")
    run_train(*keys, "gradient_accumulation_steps=2", f"resume_from={checkpoint}")
    assert_same_weights(adapter_weights(runs / "two" / "lora"), adapter_weights(tmp_path / "resumed"))
    assert_same_rows(metrics(runs / "two" / "lora")[2:], metrics(tmp_path / "resumed"))


def test_helper_on_one_process_keeps_everything() -> None:
    state = process_state()
    assert split_for_process(["a", "b", "c"], state) == (["a", "b", "c"], 0)
    assert gather_in_order(["a", "b"], state) == ["a", "b"]


@pytest.mark.slow
def test_helper_splits_and_merges_in_order_on_two_processes(tmp_path: Path) -> None:
    """Started by torchrun on a machine without GPUs: the processes find each other over gloo by themselves."""
    driver = write_script(tmp_path / "helper.py", HELPER_DRIVER)
    env = {k: v for k, v in launch_env(tmp_path).items() if k != "ACCELERATE_USE_CPU"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*command, str(driver), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["processes"] for r in records] == [2, 2]
    shares = {n: [(r["found"][n]["start"], len(r["found"][n]["mine"])) for r in records] for n in ("0", "1", "5", "6")}
    assert shares == {"0": [(0, 0), (0, 0)], "1": [(0, 1), (1, 0)], "5": [(0, 3), (3, 2)], "6": [(0, 3), (3, 3)]}
    for n in ("0", "1", "5", "6"):
        merged = records[0]["found"][n]["merged"]
        assert merged == records[1]["found"][n]["merged"]  # every process receives the whole list
        assert [a["prompt"] for a in merged] == [f"prompt-{i}" for i in range(int(n))]
        assert [a["index"] for a in merged] == list(range(int(n)))
        assert {a["rank"] for a in merged} == set(range(min(int(n), 2)))  # both processes answered their share


def test_accelerate_configs_are_valid() -> None:
    """Each example loads as accelerate's own config and names only options `accelerate launch` knows."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    known = {action.dest for action in launch_command_parser()._actions}
    expected = {
        "single-gpu.yaml": ("NO", 1),
        "multi-gpu.yaml": ("MULTI_GPU", 1),
        "multi-node.yaml": ("MULTI_GPU", 2),
        "fsdp.yaml": ("FSDP", 1),
        "deepspeed-zero2.yaml": ("DEEPSPEED", 1),
        "deepspeed-zero3.yaml": ("DEEPSPEED", 1),
        "deepspeed-zero3-offload.yaml": ("DEEPSPEED", 1),
    }
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(expected)
    for name, (kind, machines) in expected.items():
        path = CONFIGS / name
        assert path.read_text().startswith("# "), name  # a line on when to use it
        config = load_config_from_file(str(path))
        assert (config.distributed_type.value, config.num_machines) == (kind, machines)
        for key in [*config.fsdp_config, *config.deepspeed_config]:
            assert key in known, (name, key)


def _single_process_group(store_file: Path) -> None:
    store = torch.distributed.FileStore(str(store_file), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)


def test_a_command_closes_the_group_it_opened(tmp_path: Path) -> None:
    from dpokit.distributed import owned_process_group

    with owned_process_group():
        _single_process_group(tmp_path / "store")
        assert torch.distributed.is_initialized()
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="boom"), owned_process_group():  # an error on the way out closes it too
        _single_process_group(tmp_path / "store-2")
        raise RuntimeError("boom")
    assert not torch.distributed.is_initialized()


def test_a_group_open_before_belongs_to_its_creator(tmp_path: Path) -> None:
    from dpokit.distributed import close_process_group, owned_process_group

    _single_process_group(tmp_path / "store")
    try:
        with owned_process_group():
            pass
        assert torch.distributed.is_initialized()  # a notebook's group outlives the command it ran
    finally:
        close_process_group()
    assert not torch.distributed.is_initialized()


EXIT_SCRIPT = """
import atexit, sys
from dpokit.distributed import exit_process
atexit.register(lambda: print("teardown ran"))
print("work done", end="")  # unflushed: exit_process must flush it
exit_process(3)
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_process_flushes_and_keeps_the_code(world_size: str) -> None:
    """Alone, a process exits as usual (atexit runs); launched as one of several it skips the interpreter's
    teardown, where native threads abort the process, and still flushes its output and keeps its exit code."""
    env = {**os.environ, "PYTHONPATH": SRC, "WORLD_SIZE": world_size}
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stdout == ("work doneteardown ran\n" if world_size == "1" else "work done")
