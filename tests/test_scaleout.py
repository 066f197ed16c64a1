"""DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 on two CPU processes, against one process with the same global batch.

One launch per engine runs every training that engine needs (starting two processes costs more than the
trainings): LoRA with the precomputed reference on all three, and with gradient accumulation under DeepSpeed;
full fine-tuning under ZeRO-3 (precomputed
reference) and FSDP2 (a frozen copy, sharded like the policy); and under ZeRO-3 a run continued from a
one-process checkpoint. The one-process runs, and the runs continued on one process from the engines'
checkpoints, run in the test process.

Tolerance: everything is fp32 (bf16=false); the layouts differ only in the order of the gradient reductions and
how pairs are batched into forward passes. Logged values agree to 1e-5, weights to 1e-6 after one step and to
1e-5 after three (AdamW divides each entry by its own running scale, so last-bit differences in an entry near zero
move that weight by a small fraction of the learning rate, 1e-3 here). The logged grad_norm pins the gradient's
size, which AdamW would hide. Measured: at most 2e-6 after three steps.

The first DeepSpeed launch on a machine builds DeepSpeed's shared-memory communication op for the CPU (minutes,
once; cached under ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import conversational_rows, write_jsonl
from test_distributed import (
    STEP_ATOL,
    assert_same_rows,
    assert_same_weights,
    free_port,
    launch_env,
    write_script,
)
from test_train import adapter_weights, metrics, run_train, settings

pytestmark = pytest.mark.distributed

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1"]
ENGINES = {  # the flags `accelerate launch` takes for each engine, and what dpokit says it runs
    "zero2": (["--use_deepspeed", "--zero_stage", "2"], "engine: DeepSpeed ZeRO-2, 2 processes on cpu (gloo)"),
    "zero3": (["--use_deepspeed", "--zero_stage", "3"], "engine: DeepSpeed ZeRO-3, 2 processes on cpu (gloo)"),
    "fsdp2": (["--use_fsdp", "--fsdp_version", "2"], "engine: FSDP2 (torch fully_shard"),
}

DRIVER = """
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


def lora_keys(model_dir: Path, root: Path, out: Path, per_device: int, *extra: str) -> list[str]:
    keys = [f"per_device_train_batch_size={per_device}", "max_steps=3", "save_steps=1", "warmup_ratio=0", *extra]
    evaluation = [f"eval_data={root / 'eval.jsonl'}", "per_device_eval_batch_size=2"]  # 7 pairs: one pad pair
    return settings(model_dir, root / "pairs.jsonl", out, *evaluation, *keys)


def full_keys(model_dir: Path, root: Path, out: Path, per_device: int, *extra: str) -> list[str]:
    keys = ["use_peft=false", "learning_rate=1e-4", f"per_device_train_batch_size={per_device}", "max_steps=2"]
    return settings(model_dir, root / "pairs.jsonl", out, "warmup_ratio=0", *keys, *extra)


def launch(engine: str, root: Path, plan: list[list[str]], env: dict[str, str] | None = None) -> str:
    flags, _ = ENGINES[engine]
    command = [*LAUNCH, *flags, "--mixed_precision", "no", "--main_process_port", str(free_port())]
    driver = write_script(root / "driver.py", DRIVER)
    done = subprocess.run(
        [*command, str(driver), json.dumps(plan)],
        env=env or launch_env(root / "cache-two"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr + done.stdout


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`root/one/*`: one process x 4 pairs; `root/<engine>/*`: two processes x 2 pairs under each engine."""
    root = tmp_path_factory.mktemp("scaleout")
    write_jsonl(root / "pairs.jsonl", conversational_rows(24))
    write_jsonl(root / "eval.jsonl", conversational_rows(7, seed=1))
    m = tiny_model_dir
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPOKIT_CACHE", str(root / "cache-one"))
        run_train(*lora_keys(m, root, root / "one" / "lora", per_device=4))
        run_train(*full_keys(m, root, root / "one" / "full", per_device=4))
    one_checkpoint = root / "one" / "lora" / "checkpoints" / "step-1"
    plans = {
        "zero2": [
            lora_keys(m, root, root / "zero2" / "lora", 2),
            lora_keys(m, root, root / "zero2" / "accumulated", 1, "gradient_accumulation_steps=2"),
        ],
        "zero3": [
            lora_keys(m, root, root / "zero3" / "lora", 2),
            lora_keys(m, root, root / "zero3" / "accumulated", 1, "gradient_accumulation_steps=2"),
            full_keys(m, root, root / "zero3" / "full", 2),
            lora_keys(m, root, root / "zero3" / "resumed", 2, f"resume_from={one_checkpoint}"),
        ],
        "fsdp2": [
            lora_keys(m, root, root / "fsdp2" / "lora", 2),
            full_keys(m, root, root / "fsdp2" / "full", 2, "precompute_ref_log_probs=false"),
        ],
    }
    for engine, plan in plans.items():
        (root / f"{engine}.log").write_text(launch(engine, root, plan))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_one_step_under_the_engine_equals_one_process(runs: Path, engine: str) -> None:
    """2 processes x 2 pairs under the engine and 1 process x 4 pairs: the same loss and LoRA weights after one
    step, and the same logged values (loss, grad_norm, rewards, log-probs, and the evaluation's) at every step."""
    one, two = runs / "one" / "lora", runs / engine / "lora"
    assert metrics(two)[0]["loss"] == pytest.approx(metrics(one)[0]["loss"], rel=1e-6)
    after_one_step = [load_file(str(run / "checkpoints" / "step-1" / "trainable.safetensors")) for run in (one, two)]
    assert_same_weights(*after_one_step, atol=STEP_ATOL)
    assert sum(float(v.abs().sum()) for k, v in after_one_step[1].items() if "lora_B" in k) > 0  # the step moved
    assert_same_rows(metrics(one), metrics(two))
    assert ENGINES[engine][1] in (runs / f"{engine}.log").read_text()  # said at start


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_run_saves_one_plain_peft_adapter(runs: Path, engine: str, tiny_model_dir: Path) -> None:
    """Written once, by the main process; loads in plain peft; equals the one-process run's (which equals DDP's,
    test_distributed)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    two = runs / engine / "lora"
    assert sorted(p.relative_to(two).as_posix() for p in two.rglob("adapter_model.safetensors")) == [
        "adapter/adapter_model.safetensors",
        "checkpoints/step-1/adapter/adapter_model.safetensors",
        "checkpoints/step-2/adapter/adapter_model.safetensors",
    ]
    assert [r["step"] for r in metrics(two)] == [1, 2, 3, 3]  # one row per step and evaluation: only the main
    # process writes
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch_size"] == 4
    assert_same_weights(adapter_weights(runs / "one" / "lora"), adapter_weights(two))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, two / "adapter")
    lora = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    saved = load_file(str(two / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert len(lora) == len(saved) == 28  # q, k, v, o, gate, up, down x A, B x 2 layers
    final = adapter_weights(two)
    assert all(torch.equal(v, final[k.replace(".default", "")]) for k, v in lora.items())


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_checkpoint_resumes_on_one_process(
    runs: Path, engine: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saved under the engine by 2 processes x 2 pairs at step 1, finished by 1 process x 4 pairs: the weights and
    logged values of the uninterrupted run."""
    monkeypatch.setenv("DPOKIT_CACHE", str(runs / "cache-one"))
    checkpoint = runs / engine / "lora" / "checkpoints" / "step-1"
    run_train(*lora_keys(tiny_model_dir, runs, tmp_path / "resumed", 4, f"resume_from={checkpoint}"))
    assert_same_weights(adapter_weights(runs / engine / "lora"), adapter_weights(tmp_path / "resumed"))
    assert_same_rows(metrics(runs / engine / "lora")[1:], metrics(tmp_path / "resumed"))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_gradient_accumulation_under_deepspeed(runs: Path, engine: str) -> None:
    """2 processes x 1 pair x 2 passes: DeepSpeed is told which pass ends the step and does not divide the loss
    again; the same steps as 1 process x 4 pairs."""
    assert_same_weights(adapter_weights(runs / "one" / "lora"), adapter_weights(runs / engine / "accumulated"))
    assert_same_rows(metrics(runs / "one" / "lora"), metrics(runs / engine / "accumulated"))


@pytest.mark.slow
def test_one_process_checkpoint_resumes_under_zero3(runs: Path) -> None:
    """The other way: a one-process checkpoint continued by 2 processes under ZeRO-3 (the optimizer state set into
    DeepSpeed's flat shards) ends where the uninterrupted one-process run does."""
    assert_same_weights(adapter_weights(runs / "one" / "lora"), adapter_weights(runs / "zero3" / "resumed"))
    assert "resuming from" in (runs / "zero3.log").read_text()
    rows = metrics(runs / "zero3" / "resumed")
    assert [r["step"] for r in rows] == [2, 3, 3]  # a new output_dir: the steps after the checkpoint, and eval
    assert_same_rows(metrics(runs / "one" / "lora")[1:], rows)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine", "reference"),
    [
        ("zero3", "reference: log-probs precomputed before the first step; no reference weights are kept"),
        ("fsdp2", "reference: a frozen copy of the starting weights, sharded by FSDP2 like the policy"),
    ],
)
def test_full_finetuning_with_sharded_weights(runs: Path, engine: str, reference: str) -> None:
    """Whole weights gathered into one plain transformers folder, equal to one process's; the reference's place
    said in the first lines."""
    one, two = runs / "one" / "full", runs / engine / "full"
    assert_same_weights(
        load_file(str(one / "model" / "model.safetensors")), load_file(str(two / "model" / "model.safetensors"))
    )
    assert_same_rows(metrics(one), metrics(two))
    assert reference in (runs / f"{engine}.log").read_text()


def test_full_finetuning_under_zero3_without_a_reference_is_refused() -> None:
    from dpokit.config import load_config
    from dpokit.engines import Engine
    from dpokit.errors import UserError
    from dpokit.reference import ReferencePlan

    plan = ReferencePlan.from_config(load_config(None, ["use_peft=false", "precompute_ref_log_probs=false"]))
    with pytest.raises(UserError, match="set precompute_ref_log_probs=true"):
        plan.where(Engine("deepspeed", 2, zero_stage=3))
    assert plan.where(Engine("deepspeed", 2, zero_stage=2)) is None  # ZeRO-2 keeps whole weights


@pytest.mark.slow
def test_dropped_deepspeed_stops_before_the_model_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    """ACCELERATE_USE_CPU=1 makes accelerate drop DeepSpeed and run DDP: one line, exit code 2, nothing loaded."""
    write_jsonl(tmp_path / "pairs.jsonl", conversational_rows(8))
    env = {**launch_env(tmp_path / "cache"), "ACCELERATE_USE_CPU": "1"}
    flags, _ = ENGINES["zero2"]
    command = [*LAUNCH, *flags, "--mixed_precision", "no", "--main_process_port", str(free_port())]
    keys = settings(tiny_model_dir, tmp_path / "pairs.jsonl", tmp_path / "out")
    done = subprocess.run(
        [*command, "-m", "dpokit", "train", *keys], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("dpokit: error:")]
    assert errors == [
        "dpokit: error: DeepSpeed was asked for (ACCELERATE_USE_DEEPSPEED=true) but accelerate runs MULTI_CPU: "
        "ACCELERATE_USE_CPU=1 or --cpu drops DeepSpeed; launch without them (dpokit runs DeepSpeed over gloo on "
        "machines without a GPU)"
    ]
    assert "exitcode: 2" in done.stderr  # the user's-mistake code, reported by the launcher (with its own traceback)
    assert "[rank0]: Traceback" not in done.stderr and "[rank1]: Traceback" not in done.stderr
    assert not (tmp_path / "out" / "config.yaml").exists() and "pairs.jsonl" not in done.stderr  # before data


@pytest.mark.slow
def test_processes_that_each_run_alone_stop(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two processes told by an MPI launcher that they are 2 of a job, without what torch needs to connect them:
    each would train alone and write the same files; both stop with one line instead."""
    write_jsonl(tmp_path / "pairs.jsonl", conversational_rows(8))
    keys = settings(tiny_model_dir, tmp_path / "pairs.jsonl", tmp_path / "out")
    base = {k: v for k, v in launch_env(tmp_path / "cache").items() if not k.startswith(("ACCELERATE_", "WORLD"))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dpokit", "train", *keys],
            env={**base, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": str(rank)},
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert "dpokit: error: 2 processes were started but each runs alone (NO, process 0 of 1)" in outputs[0][1]
    assert not (tmp_path / "out" / "config.yaml").exists()


def test_engine_guard_reads_the_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    from dpokit import engines

    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert engines.requested_engine() is None and engines.launched_processes() == 1
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert engines.requested_engine() == "FSDP"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert engines.requested_engine() == "DEEPSPEED"
    monkeypatch.setenv("PMI_SIZE", "4")
    assert engines.launched_processes() == 4


def test_sharded_configs_name_what_dpokit_sets() -> None:
    """The DeepSpeed examples leave batch, accumulation and clipping to dpokit's keys."""
    import yaml

    for path in CONFIGS.glob("deepspeed-*.yaml"):
        ds = yaml.safe_load(path.read_text())["deepspeed_config"]
        assert not {"gradient_accumulation_steps", "gradient_clipping"} & ds.keys(), path.name
    assert os.path.exists(CONFIGS / "deepspeed-zero3-offload.yaml")


def test_deepspeed_config_takes_dpokit_keys_and_refuses_others() -> None:
    from types import SimpleNamespace

    from dpokit.config import load_config
    from dpokit.engines import fill_deepspeed_config
    from dpokit.errors import UserError

    def accelerator(ds: dict) -> SimpleNamespace:
        return SimpleNamespace(
            state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)), num_processes=2
        )

    cfg = load_config(None, ["per_device_train_batch_size=2", "gradient_accumulation_steps=3", "max_grad_norm=0.5"])
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "zero_optimization": {}}
    fill_deepspeed_config(accelerator(ds), cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5 and ds["train_batch_size"] == 12  # 2 x 3 x 2 processes
    with pytest.raises(UserError, match="sets gradient_clipping=1.0 but dpokit's config gives 0.5"):
        fill_deepspeed_config(accelerator({"gradient_clipping": 1.0}), cfg)
