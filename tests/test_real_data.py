"""Other projects' real preference files, read as they are: the first row of each pair file becomes exactly the
triplet `first_rows.expected.jsonl` spells out, under `data prepare`, `data inspect` and `train`, and the files
that hold no pairs are refused by name. The files are not part of this repository: the test reads them from
`../shared/real-data` beside the repository (or `$DPOKIT_REAL_DATA`) and skips when they are not there.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from conftest import REAL_DATA
from dpokit.cli import main
from dpokit.data import Pair
from dpokit.data.formats import Options, to_conversational
from dpokit.data.inspection import parse_columns
from dpokit.data.load import PairReader

PREFERENCE = REAL_DATA / "preference"
EXPECTED = PREFERENCE / "first_rows.expected.jsonl"

pytestmark = pytest.mark.skipif(not EXPECTED.is_file(), reason=f"no real data at {REAL_DATA}")

# The layout each file is detected as (ours to decide, so written here), or the refusal it gets.
FORMAT_OF = {
    "llamafactory/dpo_en_demo.first200.json": "sharegpt",
    "llamafactory/dpo_zh_demo.first200.json": "sharegpt",
    "llamafactory/v1_dpo_demo.jsonl": "chosen-messages",
    "llamafactory/kto_en_demo.first20.json": "unpaired",
    "torchtune/hh_rlhf_tiny.json": "implicit",
    "torchtune/stack_exchange_paired_tiny.json": "stack-exchange",
    "trl_zen/standard_preference.jsonl": "trl",
    "trl_zen/standard_implicit_prompt_preference.jsonl": "implicit",
    "trl_zen/conversational_preference.jsonl": "trl",
    "trl_zen/conversational_implicit_prompt_preference.jsonl": "implicit",
    "trl_zen/standard_unpaired_preference.jsonl": "unpaired",
    "trl_zen/conversational_unpaired_preference.jsonl": "unpaired",
    "axolotl/assistant_dataset.jsonl": "messages",
    "axolotl/custom_assistant_dataset.jsonl": "columns",
    "axolotl/argilla_chat_dataset.jsonl": "implicit",
    "anthropic_hh_rlhf/harmless-base_test.first200.jsonl": "hh-rlhf",
    "azure_foundry/orca_dpo_pairs_validation.first200.jsonl": "openai",
    "medicalgpt/dpo_zh_500.first200.jsonl": "sharegpt",
    "medicalgpt/toolcall_dpo_zh_demo.jsonl": "sharegpt",
    "medicalgpt/dpo_zh_500_v2024.first200.jsonl": "medicalgpt",
    "medicalgpt/reward_test_v2023.json": "medicalgpt",
    "nemo_aligner/dummy-dpo.jsonl": "nemo-aligner",
    "nemo_aligner/test-rm.jsonl": "scored",
    "colossalai/test_dpo_data.jsonl": "colossalchat",
    "colossalai/test_dpo_data.v2024-03.jsonl": "colossalchat",
}
# axolotl's custom field names are read through a mapping alone (speaker/text and `agent` need no more)
COLUMNS = {"axolotl/custom_assistant_dataset.jsonl": "{prompt: conversation, chosen: better, rejected: worse}"}


def expectations() -> list[dict]:
    return (
        [json.loads(line) for line in EXPECTED.read_text(encoding="utf-8").splitlines()] if EXPECTED.is_file() else []
    )


PAIR_FILES = [e for e in expectations() if e.get("pairs", True) is not None]
NOT_PAIR_FILES = [e for e in expectations() if e.get("pairs", True) is None]
ids = lambda entries: [e["file"] for e in entries]  # noqa: E731


def test_every_file_is_covered():
    assert (len(PAIR_FILES), len(NOT_PAIR_FILES)) == (21, 4)
    assert {e["file"] for e in expectations()} == set(FORMAT_OF)


def linked(entry: dict, folder: Path) -> Path:
    """The file through a link in `folder`, so that side files are written there and never beside the original."""
    link = folder / entry["file"].replace("/", "__")
    link.symlink_to(PREFERENCE / entry["file"])
    return link


def column_args(entry: dict) -> list[str]:
    return ["--columns", COLUMNS[entry["file"]]] if entry["file"] in COLUMNS else []


def expected_conversation(entry: dict) -> dict:
    return {"prompt": entry["prompt_messages"], "chosen": entry["chosen"], "rejected": entry["rejected"]}


def final_texts(pair: dict) -> dict:
    """A triplet as the expectations write it: prompt messages, and the last assistant text of each response."""
    return {
        "prompt": pair["prompt"],
        "chosen": pair["chosen"][-1]["content"],
        "rejected": pair["rejected"][-1]["content"],
    }


@pytest.mark.parametrize("entry", PAIR_FILES, ids=ids(PAIR_FILES))
def test_prepare_gives_the_first_row_triplet(entry, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    argv = ["data", "prepare", str(PREFERENCE / entry["file"]), "--output", str(out), "--test-size", "0"]
    assert main(argv + column_args(entry)) == 0
    name = FORMAT_OF[entry["file"]]
    assert f"(format {name}, detected from columns " in capsys.readouterr().out or name == "columns"
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert final_texts(first) == expected_conversation(entry)


@pytest.mark.parametrize("entry", PAIR_FILES, ids=ids(PAIR_FILES))
def test_inspect_reads_every_row_and_the_first_row_triplet(entry, tmp_path, capsys, tiny_model_dir):
    path = linked(entry, tmp_path)
    assert main(["data", "inspect", str(path), "--model", str(tiny_model_dir), "--json", *column_args(entry)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["format"], stats["bad_rows"]) == (FORMAT_OF[entry["file"]], 0)
    assert stats["pairs"] == stats["rows"] - sum(stats["counts"].get(k, 0) for k in stats["counts"] if "dropped" in k)
    options = Options(columns=parse_columns(COLUMNS.get(entry["file"])))
    first = next(iter(PairReader(str(path), options=options)))  # what inspect reads
    assert final_texts(to_conversational(first).to_dict()) == expected_conversation(entry)


def expected_pair(entry: dict, standard: bool) -> Pair:
    """The expectation as the pair training encodes: texts for a standard pair, else messages."""
    if standard:
        return Pair(entry["prompt_text"], entry["chosen"], entry["rejected"])
    assistant = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    return Pair(entry["prompt_messages"], assistant(entry["chosen"]), assistant(entry["rejected"]))


@pytest.mark.parametrize("entry", PAIR_FILES, ids=ids(PAIR_FILES))
def test_training_data_starts_with_the_first_row_triplet(entry, tmp_path, tiny_model_dir):
    """`train`'s own data step: its first tokenized pair is the expected triplet, token for token."""
    from rich.console import Console
    from transformers import AutoTokenizer

    from dpokit.config import load_config
    from dpokit.data.encode import encode_pairs
    from dpokit.train import load_split

    path = linked(entry, tmp_path)
    mapping = [f"columns={COLUMNS[entry['file']]}"] if entry["file"] in COLUMNS else []
    keys = [f"train_data={path}", f"output_dir={tmp_path / 'run'}", "max_length=1000000", *mapping]
    cfg = load_config(None, [f"model_name_or_path={tiny_model_dir}", *keys])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data, stats = load_split(cfg, tokenizer, "train", Console(file=io.StringIO()))
    assert (stats["format"], stats["bad_rows"]) == (FORMAT_OF[entry["file"]], 0)
    standard = stats["conversational_pairs"] == 0
    (expected,) = encode_pairs(tokenizer, [expected_pair(entry, standard)])
    assert data.pairs[0] == expected


def test_train_runs_on_the_hh_sample_with_its_empty_response(tmp_path, capsys, tiny_model_dir):
    entry = next(e for e in PAIR_FILES if e["file"].startswith("anthropic_hh_rlhf/"))
    path, out = linked(entry, tmp_path), tmp_path / "run"
    settings = [f"model_name_or_path={tiny_model_dir}", f"train_data={path}", f"output_dir={out}", "bf16=false"]
    assert main(["train", *settings, "max_steps=1", "max_length=64"]) == 0
    assert (
        "train data warning: 1 pair with an empty chosen or rejected response, kept as given" in capsys.readouterr().err
    )
    (note,) = [json.loads(line) for line in (out / f"{path.stem}.rejected.jsonl").read_text().splitlines()]
    assert (note["origin"], note["kind"]) == (f"{path}:87", "empty response")
    assert json.loads((out / "summary.json").read_text())["output"] == str(out / "adapter")


@pytest.mark.parametrize("entry", NOT_PAIR_FILES, ids=ids(NOT_PAIR_FILES))
def test_files_without_pairs_are_refused_by_name(entry, tmp_path, capsys, tiny_model_dir):
    path = linked(entry, tmp_path)
    name = FORMAT_OF[entry["file"]]
    for argv in (
        ["data", "prepare", str(path), "--output", str(tmp_path / "o.jsonl"), "--test-size", "0"],
        ["data", "inspect", str(path), "--model", str(tiny_model_dir)],
        ["train", f"model_name_or_path={tiny_model_dir}", f"train_data={path}", f"output_dir={tmp_path / 'run'}"],
    ):
        assert main(argv) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"dpokit: error: {path}: format {name} (columns ")
        assert "DPO needs two responses to the same prompt" in line and "`rated`" in line and "dpokit generate" in line
