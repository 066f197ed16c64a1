"""QLoRA: LoRA trained on a 4-bit or 8-bit base through bitsandbytes (on CPU), and what is made from it."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import conversational_rows, write_jsonl
from dpokit.cli import main
from dpokit.config import load_config
from dpokit.train import train

bnb = pytest.importorskip("bitsandbytes")

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROBE = [{"role": "user", "content": "How many legs does a spider have? Answer briefly."}]
# The reloaded adapter on a full-precision base that carries the same 4-bit values (dequantized) computes what the
# training-time model computed, up to float summation order: 1e-4 of the largest logit.
SAME_VALUES_TOLERANCE = 1e-4
# On the plain full-precision base the difference is the base's own 4-bit rounding: no more than 1.25 times what
# rounding alone changes in the base without the adapter (measured: 0.99 on the built-in model, 0.82 on the tiny one).
ROUNDING_RATIO = 1.25


def settings(model_dir: Path | str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model_name_or_path={model_dir}",
        f"train_data={data}",
        f"output_dir={out}",
        "learning_rate=5e-3",
        "warmup_ratio=0",
        "bf16=false",
        "logging_steps=1",
        "load_in_4bit=true",
        *extra,
    ]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_rows(out: Path) -> list[dict]:
    return [r for r in metrics(out) if "loss" in r]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("qlora-data") / "pairs.jsonl", conversational_rows(24))


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir: Path, pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-bit NF4 run on the tiny model: 4 steps of 4 pairs, a checkpoint at step 2, evaluated at the end."""
    out = tmp_path_factory.mktemp("qlora") / "run"
    args = settings(tiny_model_dir, pairs, out, "max_steps=4", "per_device_train_batch_size=4", "save_steps=2")
    assert main(["train", *args, f"eval_data={pairs}"]) == 0
    return out


def test_4bit_run_starts_at_log2_learns_and_records_quantization(
    qlora_run: Path, tiny_model_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    rows = train_rows(qlora_run)
    # step 1 is measured before any update against the same quantized base with the adapter off: log 2, rewards 0
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/chosen"] == 0.0 and rows[0]["rewards/rejected"] == 0.0
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05
    summary = json.loads((qlora_run / "summary.json").read_text())
    quant = summary["quantization"]
    assert {k: quant[k] for k in ("bits", "quant_type", "nested", "compute_dtype")} == {
        "bits": 4,
        "quant_type": "nf4",
        "nested": False,
        "compute_dtype": "float32",
    }
    # the tiny model's linear weights are 4-bit; its embeddings and norms stay fp32
    assert quant["weights_stored_mb"] < 0.6 * quant["weights_fp32_mb"]
    assert json.loads((qlora_run / "adapter" / "dpokit.json").read_text())["quantization"]["bits"] == 4
    # only LoRA weights are trained: the checkpoint's trainable weights are the adapter's, and they moved
    trainable = load_file(str(qlora_run / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)
    assert sum(float(v.abs().sum()) for k, v in trainable.items() if "lora_B" in k) > 0


def test_only_lora_weights_train_on_the_quantized_base(tiny_model_dir: Path, pairs: Path, tmp_path: Path) -> None:
    from dpokit import quantization
    from dpokit.startup import load_policy

    cfg = load_config(None, settings(tiny_model_dir, pairs, tmp_path / "x"))
    quant = quantization.for_run(cfg, torch.device("cpu"))
    model = load_policy(cfg, torch.device("cpu"), quant)
    linears = [m for n, m in model.named_modules() if n.endswith("q_proj.base_layer")]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    memory = quantization.weight_memory(model)
    # 4-bit: half a byte per value plus one fp32 scale per block of 64 values; embeddings (tied) and norms in fp32
    assert memory.stored < 0.55 * memory.fp32 and memory.fp32 == 2 * memory.bf16  # measured 0.50


@pytest.mark.parametrize(
    "extra",
    [
        ["load_in_4bit=false", "load_in_8bit=true"],
        ["bnb_4bit_quant_type=fp4", "use_bnb_nested_quant=true", "bf16=true"],
    ],
    ids=["8bit", "fp4-nested-bf16"],
)
def test_other_quantizations_start_at_log2_and_learn(
    tiny_model_dir: Path, pairs: Path, tmp_path: Path, extra: list[str]
) -> None:
    out = tmp_path / "run"
    summary = train(
        load_config(None, settings(tiny_model_dir, pairs, out, "max_steps=3", "per_device_train_batch_size=4", *extra))
    )
    rows = train_rows(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/chosen"] == 0.0
    assert rows[-1]["loss"] < rows[0]["loss"]
    expected = {"bits": 8} if "load_in_8bit=true" in extra else {"bits": 4, "quant_type": "fp4", "nested": True}
    assert expected.items() <= summary["quantization"].items()
    if "bf16=true" in extra:
        assert summary["quantization"]["compute_dtype"] == "bfloat16"  # auto follows the run's precision


@pytest.mark.parametrize(
    "keys",
    [
        {"load_in_4bit": True},
        {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "use_bnb_nested_quant": True, "dtype": "bfloat16"},
        {"load_in_8bit": True},
    ],
)
def test_the_keys_build_trls_bitsandbytes_config(keys: dict) -> None:
    """The same key values give the BitsAndBytesConfig TRL builds from its ModelConfig (TRL's `dtype` is our
    compute dtype)."""
    from trl import ModelConfig
    from trl.trainer.utils import get_quantization_config

    from dpokit import quantization

    dtype = keys.get("dtype", "float32")
    ours = {k: v for k, v in keys.items() if k != "dtype"} | {"bnb_4bit_compute_dtype": dtype}
    cfg = load_config(None, {"load_in_4bit": False, **ours})
    mine = quantization.load_kwargs(quantization.for_run(cfg, torch.device("cpu")), torch.device("cpu"))
    trl = get_quantization_config(ModelConfig(**{"dtype": "float32", **keys}))
    assert mine["quantization_config"].to_dict() == trl.to_dict()


def test_precompute_on_and_off_give_the_same_steps(tiny_model_dir: Path, pairs: Path, tmp_path: Path) -> None:
    losses = {}
    for precompute in ("true", "false"):
        out = tmp_path / precompute
        args = settings(tiny_model_dir, pairs, out, "max_steps=3", "per_device_train_batch_size=4")
        train(load_config(None, [*args, f"precompute_ref_log_probs={precompute}"]))
        losses[precompute] = [r["loss"] for r in train_rows(out)]
    assert losses["true"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses["false"] == pytest.approx(losses["true"], abs=1e-5)


def test_resume_after_sigkill_equals_the_uninterrupted_run(tiny_model_dir: Path, pairs: Path, tmp_path: Path) -> None:
    common = ["max_steps=12", "per_device_train_batch_size=2", "save_steps=4", "disable_dropout=false"]
    straight = tmp_path / "straight"
    train(load_config(None, settings(tiny_model_dir, pairs, straight, *common)))

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpokit", "train", *settings(tiny_model_dir, pairs, killed, *common)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 180
    while time.time() < deadline and not ((killed / "checkpoints" / "step-4").is_dir() and len(metrics(killed)) >= 6):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to save: the run continues from its last periodic checkpoint
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    steps_done = len(metrics(killed))
    assert 6 <= steps_done < 12

    train(load_config(None, [*settings(tiny_model_dir, pairs, killed, *common), "resume=true"]))
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert [r["step"] for r in metrics(killed)] == list(range(1, 13))
    assert [r["loss"] for r in metrics(killed)] == pytest.approx([r["loss"] for r in metrics(straight)], abs=1e-6)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["use_peft=false"], "quantized weights cannot be trained, only LoRA adapters on them; set use_peft=true"),
        (["load_in_8bit=true"], "`load_in_4bit` and `load_in_8bit` are both true; choose one"),
        (["lora_target_modules=wq,wv"], "config key `lora_target_modules`: Target modules"),
    ],
    ids=["no-lora", "4-and-8", "no-such-target"],
)
def test_refusals_are_one_line(
    tiny_model_dir: Path, pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra, message
) -> None:
    assert main(["train", *settings(tiny_model_dir, pairs, tmp_path / "out", *extra)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("dpokit: error: ") and "Traceback" not in "\n".join(err)


def test_without_bitsandbytes_the_keys_and_flags_name_the_extra(
    tiny_model_dir: Path, pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    assert main(["train", *settings(tiny_model_dir, pairs, tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "dpokit: error: load_in_4bit needs bitsandbytes, which is not installed: pip install 'dpokit[qlora]'"
    assert main(["chat", "--model", str(tiny_model_dir), "--load-in-8bit"]) == 2
    assert "load_in_8bit needs bitsandbytes" in capsys.readouterr().err


def test_probe_catches_a_broken_bitsandbytes(
    tiny_model_dir: Path, pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("libbitsandbytes_cpu.so: cannot open shared object file")

    monkeypatch.setattr(bnb, "matmul_4bit", broken)
    started = time.perf_counter()
    assert main(["train", *settings(tiny_model_dir, pairs, tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"load_in_4bit: bitsandbytes {bnb.__version__} cannot run on cpu (RuntimeError: libbitsandbytes_cpu" in err
    assert "set load_in_4bit=false" in err and not (tmp_path / "out" / "config.yaml").exists()

    monkeypatch.setattr(bnb, "matmul_4bit", lambda A, B, quant_state, out=None, bias=None: A @ A.new_zeros(64, 64))
    assert main(["train", *settings(tiny_model_dir, pairs, tmp_path / "out")]) == 2
    assert "a 4-bit nf4 layer computes wrong numbers" in capsys.readouterr().err
    assert time.perf_counter() - started < 30


def test_adapter_merges_into_full_precision_weights(
    qlora_run: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(qlora_run / "adapter"), "--output", str(merged)]) == 0
    provenance = json.loads((merged / "merge.json").read_text())
    assert provenance["check"]["passed"] and provenance["adapter_trained_on"]["bits"] == 4
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert all(p.dtype == torch.float32 for p in plain.parameters())  # merged into full precision, not 4-bit
    # a base that is itself stored quantized is refused
    stored = tmp_path / "stored-4bit"
    AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map={"": "cpu"}
    ).save_pretrained(stored)
    code = main(
        ["merge", "--adapter", str(qlora_run / "adapter"), "--model", str(stored), "--output", str(tmp_path / "m")]
    )
    assert code == 2
    assert "is stored quantized (bitsandbytes); merge folds the adapter into full-precision" in capsys.readouterr().err


def test_inference_commands_take_the_quantization_flags(
    qlora_run: Path, pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    adapter = str(qlora_run / "adapter")
    out = tmp_path / "eval.json"
    assert (
        main(["eval", "--adapter", adapter, "--data", str(pairs), "--load-in-4bit", "--no-bf16", "--output", str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    assert result["quantization"]["bits"] == 4
    # the reference is the same quantized base with the adapter off, as in training: the margins training logged
    # on the same pairs come back
    final = json.loads((qlora_run / "summary.json").read_text())["final_eval"]
    assert result["rewards/margins"] == pytest.approx(final["eval/rewards/margins"], rel=1e-3, abs=1e-4)
    capsys.readouterr()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\nSay hello.\n")
    flags = ["--max-new-tokens", "4", "--no-bf16"]
    assert (
        main(
            [
                "vibe",
                "--adapter",
                adapter,
                "--prompts",
                str(prompts),
                "--load-in-8bit",
                *flags,
                "--output",
                str(tmp_path / "vibe.jsonl"),
            ]
        )
        == 0
    )
    assert len((tmp_path / "vibe.jsonl").read_text().splitlines()) == 2
    judge = tmp_path / "judge.py"
    judge.write_text("def length(prompt, response):\n    return float(len(response))\n")
    assert (
        main(
            [
                "generate",
                "--adapter",
                adapter,
                "--prompts",
                str(prompts),
                "--judge",
                f"python:{judge}:length",
                "--num-samples",
                "2",
                "--load-in-4bit",
                "--max-new-tokens",
                "4",
                "--no-bf16",
                "--output",
                str(tmp_path / "gen.jsonl"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "compare",
                "--adapter-b",
                adapter,
                "--prompts",
                str(prompts),
                "--judge",
                f"python:{judge}:length",
                "--load-in-4bit",
                *flags,
                "--output",
                str(tmp_path / "compare"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "compare" / "summary.json").read_text())["total"] == 2
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Hello\n/exit\n"))
    assert main(["chat", "--adapter", adapter, "--load-in-4bit", *flags]) == 0
    assert "assistant> " in capsys.readouterr().out


def _probe_logits(model, tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**inputs).logits.float()


def _with_rounded_linears(model):
    """`model` with every decoder linear weight replaced by its NF4 round trip: the values a 4-bit load holds."""
    import bitsandbytes.functional as F

    head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                packed, state = F.quantize_4bit(module.weight.data, quant_type="nf4")
                module.weight.data = F.dequantize_4bit(packed, state)
    return model


@pytest.mark.builtin
@pytest.mark.slow
def test_builtin_4bit_run_and_its_adapter_on_the_full_precision_base(tmp_path: Path) -> None:
    """On the built-in model: log 2 at step 0, rewards 0, the loss falls; the saved adapter loads with plain peft
    onto the full-precision base and computes what the training-time 4-bit model computed, apart from the base's
    own 4-bit rounding."""
    from peft import PeftModel

    from dpokit.config import BUILTIN_MODEL
    from dpokit.inference import load_for_inference
    from dpokit.models import load_model, resolve_model_path
    from dpokit.quantization import Quantization

    data = write_jsonl(tmp_path / "pairs.jsonl", conversational_rows(4))
    out = tmp_path / "run"
    # two epochs of one step: the second step sees the same pairs after one update
    extra = ["max_steps=2", "per_device_train_batch_size=4", "max_length=40", "learning_rate=1e-3"]
    train(load_config(None, settings(BUILTIN_MODEL, data, out, *extra)))
    rows = train_rows(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/chosen"] == 0.0 and rows[0]["rewards/rejected"] == 0.0
    assert rows[-1]["loss"] < rows[0]["loss"]

    adapter = out / "adapter"
    quantized, tokenizer = load_for_inference(None, str(adapter), Quantization(4, compute_dtype="float32"))
    trained = _probe_logits(quantized, tokenizer)
    with quantized.disable_adapter():
        quantized_base = _probe_logits(quantized, tokenizer)
    del quantized
    path = resolve_model_path(BUILTIN_MODEL)
    rounded = PeftModel.from_pretrained(_with_rounded_linears(load_model(path)), adapter).eval()
    scale = trained.abs().max().item()
    assert (_probe_logits(rounded, tokenizer) - trained).abs().max().item() <= SAME_VALUES_TOLERANCE * scale
    del rounded
    plain = PeftModel.from_pretrained(load_model(path), adapter).eval()  # plain peft on the fp32 base
    on_full = _probe_logits(plain, tokenizer)
    with plain.disable_adapter():
        full_base = _probe_logits(plain, tokenizer)
    rounding = (full_base - quantized_base).abs().max().item()
    assert (on_full - trained).abs().max().item() <= ROUNDING_RATIO * rounding
    assert (on_full - full_base).abs().max().item() > 0.01 * scale  # the adapter is really there
