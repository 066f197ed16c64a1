"""`dpokit sft` against TRL 1.16's SFTTrainer (tokens, labels, step-0 loss), its layouts against the plain padded
one, assistant masks on multi-turn chat, the data layouts, and exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import conversational_rows, write_jsonl
from dpokit.cli import main
from dpokit.data.sft import Example, collate_examples, encode_example
from dpokit.errors import UserError
from dpokit.logprobs import SequenceLogps
from dpokit.models import load_model, load_tokenizer
from dpokit.sft import sft
from dpokit.sft_config import load_sft_config

trl = pytest.importorskip("trl")

N = 8
# ChatML whose assistant text is marked for transformers' assistant mask, as TRL's assistant_only_loss needs
TAGGED_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_rows(n: int) -> list[dict[str, Any]]:
    """Multi-turn conversations: the pairs' prompt, the chosen answer, a follow-up and a second answer."""
    rows = []
    for i, r in enumerate(conversational_rows(n, seed=5)):
        follow = [{"role": "user", "content": "And briefly?"}, {"role": "assistant", "content": "Yes." * (1 + i % 3)}]
        rows.append({"messages": r["prompt"] + r["chosen"] + follow})
    return rows


def prompt_completion_rows(n: int, conversational: bool) -> list[dict[str, Any]]:
    rows = conversational_rows(n, seed=7)
    if conversational:
        return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    return [{"prompt": r["prompt"][-1]["content"] + "\n", "completion": r["chosen"][0]["content"]} for r in rows]


def text_rows(n: int) -> list[dict[str, Any]]:
    return [{"text": r["prompt"][-1]["content"] + " " + r["chosen"][0]["content"]} for r in conversational_rows(n)]


def example_of(row: dict[str, Any]) -> Example:
    if "messages" in row:
        return Example(messages=row["messages"])
    if "text" in row:
        return Example(text=row["text"])
    return Example(prompt=row["prompt"], completion=row["completion"])


def trl_trainer(model_dir: Path, rows: list[dict[str, Any]], tmp_path: Path, tokenizer: Any = None, **extra: Any):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    args = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(rows),
        max_length=1024,
        bf16=False,
        use_cpu=True,
        report_to=[],
        gradient_checkpointing=False,
        packing=False,
        padding_free=False,
        dataset_num_proc=None,
        **extra,
    )
    return trl.SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer or load_tokenizer(str(model_dir)),
    )


def trl_step0_loss(trainer: Any) -> float:
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    trainer.model.train()
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


KINDS = {
    "messages": lambda n: chat_rows(n),
    "prompt_completion": lambda n: prompt_completion_rows(n, conversational=True),
    "text_prompt_completion": lambda n: prompt_completion_rows(n, conversational=False),
    "text": text_rows,
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_tokens_and_labels_match_trl(tiny_model_dir: Path, tmp_path: Path, kind: str) -> None:
    rows = KINDS[kind](N)
    trainer = trl_trainer(tiny_model_dir, rows, tmp_path)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    for row, theirs in zip(rows, trainer.train_dataset, strict=True):
        ours = encode_example(tokenizer, example_of(row), completion_only=None, assistant_only=False)
        assert ours.input_ids == theirs["input_ids"]
        assert ours.trained == [label != -100 for label in theirs["labels"]]
    if kind != "messages" and kind != "text":  # prompts are masked: the comparison is not all-ones
        assert not all(ours.trained)


def run_sft(model_dir: Path, data: Path, out: Path, *extra: str) -> dict[str, Any]:
    settings = [
        f"model_name_or_path={model_dir}",
        f"train_data={data}",
        f"output_dir={out}",
        "bf16=false",
        "logging_steps=1",
        "learning_rate=1e-3",
        *extra,
    ]
    return sft(load_sft_config(None, settings))


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["messages", "prompt_completion", "text_prompt_completion"])
def test_step0_loss_matches_trl(tiny_model_dir: Path, tmp_path: Path, kind: str) -> None:
    """The first logged loss of a real `dpokit sft` run (measured before any update; LoRA starts at the base) is
    TRL's loss on the same batch, in fp32."""
    rows = KINDS[kind](N)
    trl_loss = trl_step0_loss(trl_trainer(tiny_model_dir, rows, tmp_path))
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    trl_default = "assistant_only_loss=false"  # TRL trains every token of a conversation unless told otherwise
    run_sft(tiny_model_dir, data, tmp_path / "run", "max_steps=1", f"per_device_train_batch_size={N}", trl_default)
    ours = metrics(tmp_path / "run")[0]["loss"]
    assert trl_loss > 1.0
    assert math.isclose(ours, trl_loss, rel_tol=1e-4), (ours, trl_loss)


def plain_loss(model: Any, tokenizer: Any, rows: list[dict[str, Any]], **flags: Any) -> torch.Tensor:
    """The plain definition: every example alone, full logits, shift by one, mean NLL over all trained tokens."""
    total, count = torch.zeros(()), 0
    for row in rows:
        ex = encode_example(tokenizer, example_of(row), completion_only=None, assistant_only=False, **flags)
        logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1].float()  # (T-1, V)
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ex.input_ids[1:]), reduction="none")
        trained = torch.tensor(ex.trained[1:])
        total, count = total + nll[trained].sum(), count + int(trained.sum())
    return total / count


@pytest.mark.parametrize(
    ("padding_free", "one_row", "packed"),
    [(False, False, False), (False, False, True), (True, False, False), (True, True, True)],
)
def test_layouts_and_packing_equal_the_plain_loss(
    tiny_model_dir: Path, padding_free: bool, one_row: bool, packed: bool
) -> None:
    from dpokit import attention

    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = chat_rows(6)
    model = load_model(str(tiny_model_dir))
    expected = plain_loss(model, tokenizer, rows)
    if one_row:
        assert attention.enable(model)
    examples = [encode_example(tokenizer, example_of(r), completion_only=None, assistant_only=False) for r in rows]
    samples = [i // 3 for i in range(len(rows))] if packed else list(range(len(rows)))  # two packed rows of three
    batch = collate_examples(examples, samples, tokenizer.pad_token_id, padding_free=padding_free, one_row=one_row)
    if packed and not padding_free:
        assert batch.input_ids.shape[0] == 2 and batch.segments is not None
    logps = SequenceLogps(model)(batch)
    ours = -logps.chosen.sum() / logps.chosen_lengths.sum()
    assert torch.allclose(ours, expected, rtol=1e-5), (ours, expected)
    assert int(logps.rejected_lengths.sum()) == 0


def test_packing_run_equals_unpacked_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A packed run's step-0 loss is the unpacked run's when a global batch holds the same examples."""
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(N))
    run_sft(tiny_model_dir, data, tmp_path / "plain", "max_steps=1", f"per_device_train_batch_size={N}")
    run_sft(tiny_model_dir, data, tmp_path / "packed", "max_steps=1", "packing=true", "max_length=1024")
    summary = json.loads((tmp_path / "packed" / "summary.json").read_text())
    assert summary["train_samples"] == 1 and summary["train_examples"] == N  # every example in one 1024-token row
    plain, packed = metrics(tmp_path / "plain")[0]["loss"], metrics(tmp_path / "packed")[0]["loss"]
    assert math.isclose(plain, packed, rel_tol=1e-5)
    run_files = {"config.yaml", "data_stats.json", "metrics.jsonl", "summary.json", "adapter", "tensorboard"}
    assert run_files <= {p.name for p in (tmp_path / "packed").iterdir()}
    assert list((tmp_path / "packed" / "tensorboard").glob("events.out.tfevents.*"))
    stats = json.loads((tmp_path / "packed" / "data_stats.json").read_text())["train"]
    assert stats["examples"] == N and stats["tokens"]["total"]["max"] >= stats["tokens"]["trained"]["max"] > 0
    assert "\nbeta:" not in (tmp_path / "packed" / "config.yaml").read_text()  # an SFT run saves the keys it reads


def test_assistant_mask_on_multi_turn_chat(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Both assistant turns are trained and nothing else: through an untagged template by rendering turn by turn,
    and through a `{% generation %}` template exactly as TRL's assistant_only_loss masks."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    row = chat_rows(1)[0]
    ex = encode_example(tokenizer, example_of(row), completion_only=None, assistant_only=True)
    trained_text = tokenizer.decode([t for t, on in zip(ex.input_ids, ex.trained, strict=True) if on])
    answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    assert trained_text == "".join(a + "<|im_end|>\n" for a in answers)

    tagged = load_tokenizer(str(tiny_model_dir), chat_template=TAGGED_CHATML)
    rows = chat_rows(N)
    trainer = trl_trainer(tiny_model_dir, rows, tmp_path, tokenizer=tagged, assistant_only_loss=True)
    for r, theirs in zip(rows, trainer.train_dataset, strict=True):
        ours = encode_example(tagged, example_of(r), completion_only=None, assistant_only=True)
        assert ours.input_ids == theirs["input_ids"]
        assert ours.trained == [label != -100 for label in theirs["labels"]]
    template = tmp_path / "tagged.jinja"
    template.write_text(TAGGED_CHATML)
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    run_sft(
        tiny_model_dir, data, tmp_path / "run", "max_steps=1", f"per_device_train_batch_size={N}",
        "assistant_only_loss=true", f"chat_template={template}",
    )  # fmt: skip
    assert math.isclose(metrics(tmp_path / "run")[0]["loss"], trl_step0_loss(trainer), rel_tol=1e-4)


def test_layouts_read(tiny_model_dir: Path, tmp_path: Path) -> None:
    """ShareGPT, Alpaca and the chosen side of pairs become the examples their TRL forms would."""
    from dpokit.data.sft import load_sft_data

    tokenizer = load_tokenizer(str(tiny_model_dir))
    sharegpt = [
        {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
        {"conversations": [{"from": "human", "value": "Bye?"}, {"from": "robot", "value": "x"}]},  # bad row
    ]
    alpaca = [{"instruction": "Add.", "input": "1 + 1", "output": "2"}, {"instruction": "Say hi.", "output": "hi"}]
    pairs = conversational_rows(4)
    cases = {
        "conversations": (
            sharegpt,
            [],
            [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
        ),
        "alpaca": (alpaca, [], [{"role": "user", "content": "Add.\n\n1 + 1"}, {"role": "assistant", "content": "2"}]),
        "chosen": (pairs, ["sft_on=chosen"], pairs[0]["prompt"] + pairs[0]["chosen"]),
    }
    for name, (rows, extra, first) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        cfg = load_sft_config(None, [f"train_data={path}", f"output_dir={tmp_path / name}", "max_bad_rows=1", *extra])
        data, stats = load_sft_data(cfg, tokenizer, str(path), "train", None)
        expected = tokenizer.apply_chat_template(first, tokenize=True, return_dict=True)["input_ids"]
        assert data.examples[0].input_ids == expected, name
        assert stats["examples"] == len(data) and stats["tokens"]["total"]["max"] > 0
    assert stats["format"] == "trl (chosen)" and not all(data.examples[0].trained)  # the prompt is not trained
    assert (tmp_path / "conversations" / "conversations.rejected.jsonl").is_file()


def test_bad_settings_are_one_line(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, capsys: Any) -> None:
    base = [f"model_name_or_path={tiny_model_dir}", f"train_data={pairs_file}", f"output_dir={tmp_path / 'x'}"]
    assert main(["sft", *base]) == 2
    assert "set sft_on=chosen" in capsys.readouterr().err
    assert main(["sft", *base, "beta=0.2"]) == 2
    assert "`beta` is a DPO setting" in capsys.readouterr().err
    with pytest.raises(UserError, match="packing"):
        load_sft_config(None, ["packing=true", "max_length=null"])


def test_resume_is_exact(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Continuing from the step-2 checkpoint logs the uninterrupted run's losses and ends with its weights."""
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    common = ["max_steps=4", "per_device_train_batch_size=2", "gradient_accumulation_steps=2", "save_steps=2"]
    common += ["disable_dropout=false", "lora_dropout=0.1"]  # dropout draws random numbers: the RNG state resumes too
    run_sft(tiny_model_dir, data, tmp_path / "whole", *common)
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-2"
    run_sft(tiny_model_dir, data, tmp_path / "resumed", *common, f"resume_from={checkpoint}")
    whole, resumed = metrics(tmp_path / "whole"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in whole] == [1, 2, 3, 4] and [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole[2:]]
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


LENGTH_JUDGE = "def length(prompt, response):\n    return float(len(response))\n"


def test_chain_sft_generate_train(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    """The pipeline with each command's output feeding the next: SFT on the chosen responses, sample pairs from
    the SFT model, then DPO from it."""
    sft_dir, pairs, dpo_dir = tmp_path / "sft", tmp_path / "sampled.jsonl", tmp_path / "dpo"
    sft_args = [f"model_name_or_path={tiny_model_dir}", f"train_data={pairs_file}", "sft_on=chosen"]
    sft_args += [f"output_dir={sft_dir}", "use_peft=false", "max_steps=2", "bf16=false", "learning_rate=1e-4"]
    assert main(["sft", *sft_args]) == 0
    model = json.loads((sft_dir / "summary.json").read_text())["output"]
    assert (
        model == str(sft_dir / "model")
        and json.loads((sft_dir / "model" / "dpokit.json").read_text())["stage"] == "sft"
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\nHow many legs does a spider have?\nName a sea.\n")
    judge = tmp_path / "rules.py"
    judge.write_text(LENGTH_JUDGE)
    generate_args = ["--model", model, "--prompts", str(prompts), "--judge", f"python:{judge}:length"]
    generate_args += ["--output", str(pairs), "--num-samples", "4", "--max-new-tokens", "8", "--temperature", "1.0"]
    assert main(["generate", *generate_args]) == 0
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert rows and all(r["model"] == model for r in rows)
    assert main(["train", f"model_name_or_path={model}", f"train_data={pairs}", f"output_dir={dpo_dir}",
                 "max_steps=1", "bf16=false", "per_device_train_batch_size=2"]) == 0  # fmt: skip
    assert json.loads((dpo_dir / "adapter" / "dpokit.json").read_text())["base_model"] == model


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_equal_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`accelerate launch` on 2 CPU processes x 2 samples and 1 process x 4: the same token-mean losses (the two
    processes hold different numbers of trained tokens) and the same weights."""
    import subprocess
    import sys

    from test_distributed import CONFIGS, assert_same_rows, assert_same_weights, free_port, launch_env

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    evals = write_jsonl(tmp_path / "eval.jsonl", chat_rows(5))  # odd: one process gets a zero-weight pad
    keys = ["max_steps=3", "warmup_ratio=0", f"eval_data={evals}", "per_device_eval_batch_size=2"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "multi-gpu.yaml")]
    launcher += ["--num_processes", "2", "--main_process_port", str(free_port()), "-m", "dpokit", "sft"]
    two = [f"model_name_or_path={tiny_model_dir}", f"train_data={data}", f"output_dir={tmp_path / 'two'}"]
    two += ["bf16=false", "logging_steps=1", "learning_rate=1e-3", "per_device_train_batch_size=2", *keys]
    done = subprocess.run(
        [*launcher, *two], env=launch_env(tmp_path / "cache"), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    run_sft(tiny_model_dir, data, tmp_path / "one", "per_device_train_batch_size=4", *keys)
    assert_same_rows(metrics(tmp_path / "one"), metrics(tmp_path / "two"))
    weights = [load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors")) for run in ("one", "two")]
    assert_same_weights(*weights)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2


REAL_DATA = Path("/work/shared/real-data/preference")  # other projects' files: read in place, never copied


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="the shared real-data folder is not here")
@pytest.mark.parametrize("name", ["trl_zen/conversational_preference.jsonl", "trl_zen/standard_preference.jsonl"])
def test_chosen_side_of_real_pairs(tiny_model_dir: Path, tmp_path: Path, name: str) -> None:
    """TRL's own preference rows become examples whose trained tokens are the chosen response and its end."""
    from dpokit.data.sft import load_sft_data

    tokenizer = load_tokenizer(str(tiny_model_dir))
    source = str(REAL_DATA / name)
    first = json.loads(Path(source).read_text(encoding="utf-8").splitlines()[0])
    cfg = load_sft_config(None, [f"train_data={source}", "sft_on=chosen", f"output_dir={tmp_path}"])
    data, stats = load_sft_data(cfg, tokenizer, source, "train", None)
    assert stats["examples"] == stats["rows"] == 19 and not data.bad_rows
    ex = data.examples[0]
    trained = tokenizer.decode([t for t, on in zip(ex.input_ids, ex.trained, strict=True) if on])
    chosen = first["chosen"][0]["content"] if isinstance(first["chosen"], list) else first["chosen"]
    assert trained == chosen + "<|im_end|>" + ("\n" if isinstance(first["chosen"], list) else "")


def test_conversations_train_the_assistant_turns_by_default(tiny_model_dir: Path, tmp_path: Path) -> None:
    from dpokit.data.sft import load_sft_data

    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = chat_rows(3)
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    for setting, expected in (([], "assistant"), (["assistant_only_loss=false"], "all")):
        cfg = load_sft_config(None, [f"train_data={data}", f"output_dir={tmp_path / 'run'}", *setting])
        loaded, _ = load_sft_data(cfg, tokenizer, str(data), "train", None)
        for row, ex in zip(rows, loaded.examples, strict=True):
            trained = tokenizer.decode([t for t, on in zip(ex.input_ids, ex.trained, strict=True) if on])
            answers = "".join(m["content"] + "<|im_end|>\n" for m in row["messages"] if m["role"] == "assistant")
            assert trained == (answers if expected == "assistant" else tokenizer.decode(ex.input_ids))
