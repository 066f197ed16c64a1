"""Bad input, every command: one line on stderr that names the input, exit code 2, no traceback.

Each row of `ROWS` is a command line that a user could type by mistake. The CLI runs in this process (fast, on the
tiny model); a few rows run again in a subprocess with `--debug`, where the traceback must appear instead. Paths in
a row are written `{name}` and filled from `world`: tiny models, an adapter, a run folder and small files in a
temporary folder. Log lines that come before the error (such as the data format detected) are allowed; the error is
the last line, and the only one that starts with `dpokit: error:`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dpokit.cli import main
from evaluate_helpers import make_run, write_pairs
from judge_server import free_port
from tiny import build_tokenizer, save_tiny

PREFIX = "dpokit: error:"
NO_MODEL = "no-such-org/no-such-model-1234"


def save_other(path: Path, hidden_size: int = 32, layers: int = 2) -> Path:
    """A tiny Llama unlike `save_tiny`'s in width or depth: an adapter for one does not fit the other."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every path the rows name, made once: models, an adapter in a run folder, and small good and bad files."""
    root = tmp_path_factory.mktemp("bad-inputs")
    tiny = save_tiny(root / "tiny")
    run = make_run(root, tiny)
    files = {  # {name}: (path under the temporary folder, content)
        "empty-jsonl": ("empty.jsonl", ""),
        "empty-yaml": ("empty.yaml", ""),
        "blank": ("blank.txt", "\n  \n"),
        "broken-jsonl": ("broken.jsonl", '{"prompt": "q", "chosen": "a"\n'),
        "list-yaml": ("list.yaml", "- learning_rate\n- beta\n"),
        "broken-yaml": ("broken.yaml", "learning_rate: [1e-5\n"),
        "unknown-key-yaml": ("unknown-key.yaml", "learning_rte: 1.0e-5\n"),
        "unknown-format-jsonl": ("unknown-format.jsonl", json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n"),
        "wrong-type-jsonl": ("wrong-type.jsonl", json.dumps({"prompt": "q", "chosen": 5, "rejected": "b"}) + "\n"),
        "number-prompt-jsonl": ("number-prompt.jsonl", json.dumps({"prompt": 5}) + "\n"),
        "prompts": ("prompts.txt", "Say hello.\nHow many legs does a spider have?\n"),
        "judge": ("judge.py", "def score(prompt, response):\n    return float(len(response))\n"),
        "not-a-judge": ("not_a_judge.py", "score = 3\n"),
        "metrics-garbage": ("metrics-garbage/metrics.jsonl", "this is not json\n"),
        "metrics-empty": ("metrics-empty/metrics.jsonl", ""),
        "not-an-adapter": ("not-an-adapter/adapter_config.json", "{broken"),
        "notes": ("notes/notes.txt", "my notes, not a run"),
        "other-run": ("other-run/config.yaml", "beta: 0.3\n"),
        "other-compare": ("other-compare/summary.json", "{}"),
        "other-prepared": ("other-prepared.jsonl", '{"mine": "not prepared by dpokit"}\n'),
        "other-pairs": ("other-pairs.jsonl", json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"}) + "\n"),
    }
    paths = {
        "root": str(root),
        "tiny": str(tiny),
        "wide": str(save_other(root / "wide", hidden_size=48)),
        "run": str(run),
    }
    for name, (relative, text) in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        paths[name] = str(path if "/" not in relative else path.parent)
    (root / "other-run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69}) + "\n")
    (root / "empty-folder").mkdir()
    paths |= {
        "adapter": str(run / "adapter"),
        "pairs": str(write_pairs(root / "pairs.jsonl")),
        "refused": f"openai:judge@http://127.0.0.1:{free_port()}/v1",
        "missing": str(root / "missing.jsonl"),
        "missing-yaml": str(root / "missing.yaml"),
        "missing-folder": str(root / "missing-folder"),
        "empty-folder": str(root / "empty-folder"),
        "new": str(root / "new"),
    }
    return paths


# Good command lines; a row adds what it gets wrong. A flag given twice takes its last value, as does a config key.
TRAIN = "train model_name_or_path={tiny} train_data={pairs} output_dir={new}/train max_steps=1 use_peft=false"
INSPECT = "data inspect --model {tiny}"
PREPARE = "data prepare {pairs} --model {tiny} --output {new}/p.jsonl"
JUDGE = "--judge python:{judge}:score"
GENERATE = f"generate --model {{tiny}} --num-samples 2 {JUDGE} --prompts {{prompts}} --output {{new}}/g.jsonl"
EVAL = "eval --adapter {adapter} --data {pairs}"
COMPARE = f"compare --model-a {{tiny}} --max-new-tokens 4 {JUDGE} --prompts {{prompts}} --output {{new}}/c"
MERGE = "merge --adapter {adapter} --output {new}/m"

# (id, command line, what the error line must name). A model id that does not exist fails at once: HF_HUB_OFFLINE=1.
ROWS: list[tuple[str, str, str]] = [
    # --- train: the config --------------------------------------------------------------------------------------
    ("train-missing-config", "train {missing-yaml} max_steps=1", "{missing-yaml}"),
    ("train-empty-config", "train {empty-yaml} output_dir={new}/t0", "train_data"),
    ("train-config-not-a-mapping", "train {list-yaml}", "{list-yaml}"),
    ("train-config-not-yaml", "train {broken-yaml}", "{broken-yaml}"),
    ("train-unknown-key-in-file", "train {unknown-key-yaml}", "learning_rte"),
    ("train-unknown-key", f"{TRAIN} learning_rte=1e-5", "learning_rte"),
    ("train-wrong-type", f"{TRAIN} learning_rate=fast", "learning_rate"),
    ("train-invalid-value", f"{TRAIN} beta=-1", "beta"),
    ("train-invalid-choice", f"{TRAIN} loss_type=dpo", "loss_type"),
    ("train-config-after-overrides", "train beta=0.1 {unknown-key-yaml}", "{unknown-key-yaml}"),
    ("config-unknown-key", "config {unknown-key-yaml}", "learning_rte"),
    ("unknown-command", "trian {pairs}", "trian"),
    # --- train: data, model, output folder ----------------------------------------------------------------------
    ("train-missing-data", f"{TRAIN} train_data={{missing}}", "{missing}"),
    ("train-empty-data", f"{TRAIN} train_data={{empty-jsonl}}", "{empty-jsonl}"),
    ("train-data-not-json", f"{TRAIN} train_data={{broken-jsonl}}", "{broken-jsonl}"),
    ("train-data-unknown-format", f"{TRAIN} train_data={{unknown-format-jsonl}}", "{unknown-format-jsonl}"),
    ("train-data-wrong-type", f"{TRAIN} train_data={{wrong-type-jsonl}}", "{wrong-type-jsonl}"),
    ("train-eval-data-missing", f"{TRAIN} eval_data={{missing}}", "{missing}"),
    ("train-model-does-not-exist", f"{TRAIN} model_name_or_path={NO_MODEL}", NO_MODEL),
    ("train-model-folder-missing", f"{TRAIN} model_name_or_path={{missing-folder}}", "{missing-folder}"),
    ("train-output-holds-another-run", f"{TRAIN} output_dir={{other-run}}", "{other-run}"),
    ("train-segment-attention-on-eager", f"{TRAIN} attn_implementation=eager", "segment_attention=false"),
    # --- data inspect -------------------------------------------------------------------------------------------
    ("inspect-missing-file", f"{INSPECT} {{missing}}", "{missing}"),
    ("inspect-empty-file", f"{INSPECT} {{empty-jsonl}}", "{empty-jsonl}"),
    ("inspect-empty-folder", f"{INSPECT} {{empty-folder}}", "{empty-folder}"),
    ("inspect-not-json", f"{INSPECT} {{broken-jsonl}}", "{broken-jsonl}"),
    ("inspect-unknown-format", f"{INSPECT} {{unknown-format-jsonl}}", "{unknown-format-jsonl}"),
    ("inspect-wrong-type", f"{INSPECT} {{wrong-type-jsonl}}", "{wrong-type-jsonl}"),
    ("inspect-unknown-format-name", f"{INSPECT} {{pairs}} --data-format nope", "nope"),
    ("inspect-columns-not-a-mapping", f"{INSPECT} {{pairs}} --columns '{{{{prompt: q'", "--columns"),
    ("inspect-invalid-max-length", f"{INSPECT} {{pairs}} --max-length 0", "--max-length"),
    ("inspect-columns-unknown-key", f"{INSPECT} {{pairs}} --columns '{{{{prompt: prompt, score: s}}}}'", "score"),
    ("inspect-missing-argument", INSPECT, "data"),
    ("inspect-model-does-not-exist", f"data inspect {{pairs}} --model {NO_MODEL}", NO_MODEL),
    # --- data prepare -------------------------------------------------------------------------------------------
    ("prepare-missing-file", "data prepare {missing} --output {new}/p.jsonl", "{missing}"),
    ("prepare-empty-file", "data prepare {empty-jsonl} --output {new}/p.jsonl", "{empty-jsonl}"),
    ("prepare-wrong-type", "data prepare {wrong-type-jsonl} --output {new}/p.jsonl", "{wrong-type-jsonl}"),
    ("prepare-invalid-test-size", f"{PREPARE} --test-size -1", "--test-size"),
    ("prepare-model-does-not-exist", f"{PREPARE} --model {NO_MODEL} --max-length 64", NO_MODEL),
    ("prepare-output-not-jsonl", f"{PREPARE} --output {{new}}/p.csv", "{new}/p.csv"),
    ("prepare-output-is-the-input", f"{PREPARE} --output {{pairs}}", "{pairs}"),
    ("prepare-output-exists", f"{PREPARE} --output {{other-prepared}}", "{other-prepared}"),
    # --- generate -----------------------------------------------------------------------------------------------
    ("generate-missing-prompts", f"{GENERATE} --prompts {{missing}}", "{missing}"),
    ("generate-empty-prompts", f"{GENERATE} --prompts {{blank}}", "{blank}"),
    ("generate-prompt-not-text", f"{GENERATE} --prompts {{number-prompt-jsonl}}", "{number-prompt-jsonl}"),
    ("generate-invalid-num-samples", f"{GENERATE} --num-samples 1", "--num-samples"),
    ("generate-unknown-flag", f"{GENERATE} --num-sample 4", "--num-sample"),
    ("generate-invalid-judge-option", f"{GENERATE} --judge-concurrency 0", "--judge-concurrency"),
    ("generate-unknown-judge", f"{GENERATE} --judge oracle:x", "oracle:x"),
    ("generate-judge-file-missing", f"{GENERATE} --judge python:{{new}}/j.py:score", "{new}/j.py"),
    ("generate-judge-not-a-function", f"{GENERATE} --judge python:{{not-a-judge}}:score", "{not-a-judge}"),
    ("generate-unreachable-judge", f"{GENERATE} --judge {{refused}} --judge-retries 0", "{refused}"),
    ("generate-model-does-not-exist", f"{GENERATE} --model {NO_MODEL}", NO_MODEL),
    ("generate-adapter-for-another-base", f"{GENERATE} --model {{wide}} --adapter {{adapter}}", "{adapter}"),
    ("generate-output-of-another-kind", f"{GENERATE} --output {{other-pairs}}", "{other-pairs}"),
    ("generate-output-is-a-folder", f"{GENERATE} --output {{empty-folder}}", "{empty-folder}"),
    # --- eval ---------------------------------------------------------------------------------------------------
    ("eval-missing-data", f"{EVAL} --data {{missing}}", "{missing}"),
    ("eval-empty-data", f"{EVAL} --data {{empty-jsonl}}", "{empty-jsonl}"),
    ("eval-data-unknown-format", f"{EVAL} --data {{unknown-format-jsonl}}", "{unknown-format-jsonl}"),
    ("eval-data-wrong-type", f"{EVAL} --data {{wrong-type-jsonl}}", "{wrong-type-jsonl}"),
    ("eval-invalid-beta", f"{EVAL} --beta 0", "--beta"),
    ("eval-beta-not-a-number", f"{EVAL} --beta high", "--beta"),
    ("eval-adapter-missing", f"{EVAL} --adapter {{missing-folder}}", "{missing-folder}"),
    ("eval-adapter-config-not-json", f"{EVAL} --adapter {{not-an-adapter}} --model {{tiny}}", "{not-an-adapter}"),
    ("eval-adapter-for-another-base", f"{EVAL} --model {{wide}}", "{adapter}"),
    ("eval-model-does-not-exist", f"eval --model {NO_MODEL} --reference {{tiny}} --data {{pairs}}", NO_MODEL),
    # --- compare ------------------------------------------------------------------------------------------------
    ("compare-missing-prompts", f"{COMPARE} --adapter-b {{adapter}} --prompts {{missing}}", "{missing}"),
    ("compare-empty-prompts", f"{COMPARE} --adapter-b {{adapter}} --prompts {{empty-jsonl}}", "{empty-jsonl}"),
    (
        "compare-prompt-not-text",
        f"{COMPARE} --adapter-b {{adapter}} --prompts {{number-prompt-jsonl}}",
        "{number-prompt-jsonl}",
    ),
    ("compare-invalid-max-new-tokens", f"{COMPARE} --adapter-b {{adapter}} --max-new-tokens 0", "--max-new-tokens"),
    ("compare-invalid-judge-option", f"{COMPARE} --adapter-b {{adapter}} --judge-timeout 0", "--judge-timeout"),
    ("compare-unknown-judge", f"{COMPARE} --adapter-b {{adapter}} --judge oracle:x", "oracle:x"),
    # the judge is asked before any model is looked at: model B does not even exist here
    ("compare-unreachable-judge", f"{COMPARE} --model-b {NO_MODEL} --judge {{refused}} --judge-retries 0", "{refused}"),
    # both models are checked before model A answers anything
    ("compare-model-does-not-exist", f"{COMPARE} --model-b {NO_MODEL}", NO_MODEL),
    ("compare-adapter-for-another-base", f"{COMPARE} --model-b {{wide}} --adapter-b {{adapter}}", "{adapter}"),
    ("compare-output-holds-other-files", f"{COMPARE} --adapter-b {{adapter}} --output {{notes}}", "{notes}"),
    (
        "compare-output-holds-a-comparison",
        f"{COMPARE} --adapter-b {{adapter}} --output {{other-compare}}",
        "{other-compare}",
    ),
    # --- merge --------------------------------------------------------------------------------------------------
    ("merge-adapter-missing", f"{MERGE} --adapter {{missing-folder}}", "{missing-folder}"),
    ("merge-not-an-adapter", f"{MERGE} --adapter {{empty-folder}}", "{empty-folder}"),
    ("merge-adapter-config-not-json", f"{MERGE} --adapter {{not-an-adapter}}", "{not-an-adapter}"),
    ("merge-adapter-for-another-base", f"{MERGE} --model {{wide}}", "{adapter}"),
    ("merge-model-does-not-exist", f"{MERGE} --model {NO_MODEL}", NO_MODEL),
    ("merge-output-holds-another-run", f"{MERGE} --output {{other-run}}", "{other-run}"),
    ("merge-invalid-dtype", f"{MERGE} --dtype int8", "--dtype"),
    # --- report -------------------------------------------------------------------------------------------------
    ("report-missing-folder", "report {missing-folder}", "{missing-folder}"),
    ("report-not-a-run", "report {empty-folder}", "{empty-folder}"),
    ("report-empty-metrics", "report {metrics-empty}", "{metrics-empty}"),
    ("report-metrics-not-json", "report {metrics-garbage}", "{metrics-garbage}"),
    # --- vibe reads prompts as compare does ---------------------------------------------------------------------
    ("vibe-empty-prompts", "vibe --adapter {adapter} --prompts {blank}", "{blank}"),
    # --- demo (its rows run once `dpokit.demo` has its command) -------------------------------------------------
    ("demo-output-is-a-file", "demo --output {pairs}", "{pairs}"),
    ("demo-output-holds-other-files", "demo --output {notes}", "{notes}"),
]
HAS_DEMO = importlib.util.find_spec("dpokit.demo") is not None and hasattr(
    importlib.import_module("dpokit.demo"), "run"
)


def _param(row_id: str, row: str, names: str) -> object:
    needs_demo = pytest.mark.skipif(row_id.startswith("demo-") and not HAS_DEMO, reason="no demo command yet")
    return pytest.param(row, names, id=row_id, marks=needs_demo)


def command_line(row: str, paths: dict[str, str]) -> list[str]:
    return shlex.split(row.format(**paths))


def run_cli(argv: list[str]) -> int | str | None:
    """`main`'s exit code; argparse's own errors leave through SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def check_one_error_line(err: str, names: str) -> str:
    """The contract: the last stderr line is the only error line, names the input, and there is no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert "Traceback" not in err, err
    assert lines[-1].startswith(PREFIX), err
    assert sum(line.startswith(PREFIX) for line in lines) == 1, err
    assert names in lines[-1], f"the error does not name {names!r}: {lines[-1]}"
    return lines[-1]


@pytest.mark.parametrize(("row", "names"), [_param(*row) for row in ROWS])
def test_bad_input_is_one_line_and_exit_code_2(
    world: dict[str, str], row: str, names: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_cli(command_line(row, world))
    captured = capsys.readouterr()
    check_one_error_line(captured.err, names.format(**world))
    assert code == 2


# rows run again as real processes, where stderr also holds the log lines before the error (the format detected)
DEBUG_ROWS = ["inspect-wrong-type", "merge-adapter-for-another-base"]


def _run_dpokit(argv: list[str]) -> subprocess.CompletedProcess[str]:
    src = Path(__file__).parent.parent / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dpokit", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_log_lines_before_the_error_line(world: dict[str, str]) -> None:
    row, names = next((r, n) for i, r, n in ROWS if i == "inspect-wrong-type")
    result = _run_dpokit(command_line(row, world))
    assert result.returncode == 2
    check_one_error_line(result.stderr, names.format(**world))
    assert "format trl (detected from columns prompt, chosen, rejected)" in result.stderr.splitlines()[0]


@pytest.mark.parametrize("row_id", DEBUG_ROWS)
def test_debug_shows_the_traceback(world: dict[str, str], row_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    row = next(r for i, r, _ in ROWS if i == row_id)
    argv = command_line(row, world)
    assert main(argv) == 2
    message = capsys.readouterr().err.strip().removeprefix(PREFIX).strip()
    result = _run_dpokit(["--debug", *argv])
    assert result.returncode not in (0, 2)
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"dpokit.errors.UserError: {message}"


# --- what the error lines say -------------------------------------------------------------------------------------


def test_adapter_misfit_names_the_first_tensor_that_does_not_fit(world: dict[str, str], tmp_path: Path) -> None:
    from dpokit.errors import UserError
    from dpokit.models import check_adapter_fits, load_adapter, load_model

    wide_weights = (
        r"tensor model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight is \[4, 32\] in the adapter but \[4, 48\]"
    )
    with pytest.raises(UserError, match=wide_weights):
        load_adapter(load_model(world["wide"]), world["adapter"])
    with pytest.raises(UserError, match=wide_weights):
        check_adapter_fits(world["wide"], world["adapter"])  # the same, on an empty copy, without reading weights
    # PEFT itself loads an adapter whose layers the model lacks without a word
    shallow = str(save_other(tmp_path / "shallow", layers=1))
    with pytest.raises(
        UserError, match=r"its tensor model\.layers\.1\.\S+\.lora_[AB]\.weight has no place in the model"
    ):
        load_adapter(load_model(shallow), world["adapter"])
    check_adapter_fits(world["tiny"], world["adapter"])  # its own base fits


def test_only_the_main_process_prints_the_error(
    world: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = command_line("report {missing-folder}", world)
    monkeypatch.setenv("RANK", "1")
    assert main(argv) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(PREFIX)
