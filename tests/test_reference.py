"""The reference: one decision, the same log-probs whichever strategy runs it (dropout on), and a cache key that
changes with everything that changes the numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny
from conftest import conversational_rows, write_jsonl
from dpokit import reference, startup
from dpokit.config import load_config
from dpokit.console import make_console
from dpokit.data.collate import collate
from dpokit.fingerprint import model_fingerprint
from dpokit.layout import make_batch
from dpokit.logprobs import SequenceLogps, sequence_logps_reference
from dpokit.models import load_model, load_tokenizer
from dpokit.reference import ReferencePlan, cache_path, cache_settings
from dpokit.schedule import Schedule
from dpokit.train import load_split

STRATEGIES = {  # what each run's reference is, with dropout on everywhere
    "precomputed, adapter-off": ["use_peft=true", "precompute_ref_log_probs=true"],
    "adapter-off": ["use_peft=true", "precompute_ref_log_probs=false"],
    "precomputed, starting policy": ["use_peft=false", "precompute_ref_log_probs=true"],
    "frozen copy": ["use_peft=false", "precompute_ref_log_probs=false"],
}


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with attention dropout 0.3, which only eval mode switches off."""
    path = tmp_path_factory.mktemp("dropout-model")
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(len(tokenizer))
    model.config.attention_dropout = 0.3
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def config(model_dir: Path, data: Path, out: Path, *extra: str):
    return load_config(
        None,
        [
            f"model_name_or_path={model_dir}",
            f"train_data={data}",
            f"output_dir={out}",
            "bf16=false",
            "disable_dropout=false",
            "lora_dropout=0.3",
            "per_device_train_batch_size=4",
            "max_steps=2",
            *extra,
        ],
    )


def test_reference_logps_are_the_same_in_every_strategy_with_dropout_on(
    dropout_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adapter-off, frozen copy and both precomputed tables give the starting model's eval-mode log-probs, while
    the policy they serve stays in train mode (where dropout makes its own log-probs noisy)."""
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "pairs.jsonl", conversational_rows(8))
    console = make_console(False)
    tokenizer = load_tokenizer(str(dropout_model_dir))
    indices = list(range(8))
    got = {}
    for name, extra in STRATEGIES.items():
        cfg = config(dropout_model_dir, data, tmp_path / name, *extra)
        acc, _, autocast = startup.start(cfg)
        train_set, _ = load_split(cfg, tokenizer, "train", console)
        policy = SequenceLogps(startup.load_policy(cfg, acc.device))
        setup = reference.setup(cfg, policy, acc, autocast, "no", console, tokenizer.pad_token_id)
        assert setup.plan == ReferencePlan.from_config(cfg)
        ref, _ = setup.build(Schedule.from_config(cfg, len(train_set), 1), train_set, None)
        batch = make_batch(cfg, tokenizer.pad_token_id, train_set, indices, acc.device)
        got[name] = torch.stack(ref.logps(batch, indices))
        assert policy.training and policy.model.training  # the reference pass gives the policy back in train mode
        with torch.no_grad():
            noisy = policy(batch)
        assert not torch.allclose(noisy.chosen, got[name][0], atol=1e-3)  # dropout is really on in train mode
    plain = load_split(cfg, tokenizer, "train", console)[0]
    model = load_model(str(dropout_model_dir)).eval()
    with torch.no_grad():
        # the plain definition on TRL's padded layout
        expected = sequence_logps_reference(model, collate([plain.pairs[i] for i in indices], tokenizer.pad_token_id))
    for name, logps in got.items():
        torch.testing.assert_close(
            logps,
            torch.stack([expected.chosen, expected.rejected]),
            atol=1e-5,
            rtol=1e-6,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def test_the_plan_is_decided_from_the_config_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    plans = {
        name: ReferencePlan.from_config(config(tiny_model_dir, data, tmp_path, *extra))
        for name, extra in STRATEGIES.items()
    }
    assert plans == {
        "precomputed, adapter-off": ReferencePlan("precomputed", "adapter-off"),
        "adapter-off": ReferencePlan("adapter-off"),
        "precomputed, starting policy": ReferencePlan("precomputed", "starting policy"),
        "frozen copy": ReferencePlan("frozen copy"),
    }
    simpo = config(tiny_model_dir, data, tmp_path, "loss_type=simpo")
    assert ReferencePlan.from_config(simpo) == ReferencePlan("none")


def test_cache_key_names_everything_that_changes_the_numbers(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    data_file = write_jsonl(tmp_path / "pairs.jsonl", conversational_rows(8))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    cpu = torch.device("cpu")
    passes = [[[0, 1, 2, 3], [4, 5, 6, 7]]]

    def key(*extra: str, model: torch.nn.Module | None = None, precision: str = "no", plan=passes) -> Path:
        cfg = config(tiny_model_dir, data_file, tmp_path / "run", "disable_dropout=true", *extra)
        data, _ = load_split(cfg, tokenizer, "train", make_console(False))
        module = model if model is not None else torch.nn.Sequential(torch.nn.Linear(2, 2))
        return cache_path(tmp_path, data, cache_settings(cfg, precision, module, plan, cpu))

    base = key()
    assert key() == base  # unchanged settings, unchanged key
    changed = {
        "precision": key(precision="bf16"),
        "dropout module": key(model=torch.nn.Sequential(torch.nn.Dropout(0.1))),
        "padding_free": key("padding_free=false"),
        "prefix_sharing": key("prefix_sharing=false"),
        "segment_attention": key("segment_attention=false"),
        "attn_implementation": key("attn_implementation=eager"),
        "max_length": key("max_length=512"),
        "max_prompt_length": key("max_prompt_length=64"),
        "ld_alpha": key("ld_alpha=0.5"),
        "batches": key(plan=[[[0, 1], [2, 3], [4, 5], [6, 7]]]),
    }
    model = torch.nn.Linear(2, 2)
    model.config = type("Config", (), {"to_dict": lambda self: {"attention_dropout": 0.1}})()
    changed["config dropout"] = key(model=model)
    assert len({base, *changed.values()}) == len(changed) + 1, changed

    quantized = cache_settings(config(tiny_model_dir, data_file, tmp_path), "no", model, passes, cpu)
    assert quantized["quantization"] is None  # and a quantized base's description goes in under this key
    monkeypatch.setattr(reference, "for_run", lambda cfg, device: type("Q", (), {"describe": lambda s: {"bits": 4}})())
    assert key() != base


def test_model_fingerprint_follows_the_weights_not_the_folder(tmp_path: Path) -> None:
    memo = tmp_path / "memo"
    folder = tiny.save_tiny(tmp_path / "a")
    first = model_fingerprint(str(folder), memo)
    assert model_fingerprint(str(folder), memo) == first
    moved = folder.rename(tmp_path / "b")
    assert model_fingerprint(str(moved), memo) == first  # the same bytes elsewhere are the same reference
    weights = moved / "model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert model_fingerprint(str(moved), memo) != first

    # while path, size and modification time stay the same the memo answers and no file is read: a 14 GB
    # folder is hashed once
    import json

    memo_file = memo / "file-hashes.json"
    entries = json.loads(memo_file.read_text())
    assert any(str(weights.resolve()) in k for k in entries)
    memo_file.write_text(json.dumps({k: "0" * 64 for k in entries}))
    assert model_fingerprint(str(moved), memo) != model_fingerprint(str(moved), tmp_path / "fresh-memo")


def test_hub_ids_are_fingerprinted_by_their_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    snapshots = {"org/model": str(tmp_path / "models--org--model/snapshots/abc123/config.json")}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, f, revision: snapshots.get(repo))
    first = model_fingerprint("org/model", tmp_path)
    snapshots["org/model"] = str(tmp_path / "models--org--model/snapshots/def456/config.json")
    assert model_fingerprint("org/model", tmp_path) != first  # a new revision downloaded: a new reference
    assert model_fingerprint("org/other", tmp_path) != model_fingerprint("org/model", tmp_path)


def test_the_plan_says_where_a_sharded_reference_lives(tiny_model_dir: Path, tmp_path: Path) -> None:
    from dpokit.engines import Engine
    from dpokit.errors import UserError

    data = tmp_path / "pairs.jsonl"
    zero3, fsdp2, ddp = Engine("deepspeed", 2, zero_stage=3), Engine("fsdp2", 2), Engine("ddp", 2)

    def plan(name: str, *extra: str) -> ReferencePlan:
        return ReferencePlan.from_config(config(tiny_model_dir, data, tmp_path, *STRATEGIES[name], *extra))

    assert plan("precomputed, starting policy").where(zero3) == (
        "reference: log-probs precomputed before the first step; no reference weights are kept"
    )
    assert plan("frozen copy").where(fsdp2) == (
        "reference: a frozen copy of the starting weights, sharded by FSDP2 like the policy"
    )
    with pytest.raises(UserError, match="set precompute_ref_log_probs=true"):
        plan("frozen copy").where(zero3)
    assert plan("frozen copy").where(ddp) is None  # every process holds the whole copy
    assert plan("adapter-off").where(zero3) is None and plan("precomputed, adapter-off").where(fsdp2) is None
    assert plan("frozen copy", "loss_type=simpo").where(zero3) is None  # no reference at all
