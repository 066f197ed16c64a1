"""The demo's stages end to end on a tiny model: the files each stage leaves, the result's numbers, no leaks.

The real demo (the built-in model, ten minutes) is `make demo`; here the same code runs in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpokit.config import load_config
from dpokit.demo import DemoSettings, run_demo, task
from dpokit.errors import UserError

RESULT_KEYS = {
    "win_rate",
    "ci_low",
    "ci_high",
    "metric_before",
    "metric_after",
    "train_pairs",
    "heldout_prompts",
    "minutes",
}


def tiny_settings(model: Path, **changes: object) -> DemoSettings:
    values = dict(
        model=str(model),
        train_prompts=6,
        heldout_prompts=5,
        samples=3,
        max_new_tokens=8,
        eval_max_new_tokens=8,
        steps=2,
        batch_size=2,
        generation_batch_size=12,
    )
    values.update(changes)
    return DemoSettings(**values)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, DemoSettings]:
    output = tmp_path_factory.mktemp("demo") / "out"
    settings = tiny_settings(tiny_model_dir)
    return output, run_demo(output, settings), settings


def test_result_holds_the_promised_numbers(demo_run: tuple[Path, dict, DemoSettings]) -> None:
    output, result, settings = demo_run
    saved = json.loads((output / "result.json").read_text(encoding="utf-8"))
    assert saved == result
    assert RESULT_KEYS <= saved.keys()
    assert saved["heldout_prompts"] == settings.heldout_prompts
    assert saved["wins"] + saved["ties"] + saved["losses"] == settings.heldout_prompts
    assert saved["win_rate"] == pytest.approx((saved["wins"] + saved["ties"] / 2) / settings.heldout_prompts)
    assert 0 <= saved["ci_low"] <= saved["win_rate"] <= saved["ci_high"] <= 1
    assert 0 <= saved["metric_before"] <= 1 and 0 <= saved["metric_after"] <= 1
    assert saved["train_pairs"] == len(read_jsonl(output / "pairs.jsonl")) > 0
    assert saved["minutes"] > 0


def test_the_metric_is_recomputed_from_the_saved_answers(demo_run: tuple[Path, dict, DemoSettings]) -> None:
    output, result, _ = demo_run
    compare = output / "run" / "compare"
    questions = read_jsonl(compare / "question.jsonl")
    prompts = [q["turns"][0] for q in questions]
    answers = {
        path.stem: [row["choices"][0]["turns"][0] for row in read_jsonl(path)]
        for path in (compare / "model_answer").glob("*.jsonl")
    }
    assert set(answers) == {"tiny-model0", "demo-dpo"}
    assert result["metric_before"] == task.in_range_rate(prompts, answers["tiny-model0"])
    assert result["metric_after"] == task.in_range_rate(prompts, answers["demo-dpo"])
    summary = json.loads((compare / "summary.json").read_text(encoding="utf-8"))
    assert (summary["win_rate_adjusted"], summary["ci_low"], summary["ci_high"]) == (
        result["win_rate"],
        result["ci_low"],
        result["ci_high"],
    )


def test_each_stage_leaves_the_files_of_its_command(demo_run: tuple[Path, dict, DemoSettings]) -> None:
    output, _, settings = demo_run
    run = output / "run"
    for name in ("metrics.jsonl", "config.yaml", "summary.json", "adapter", "report.html", "vibe.jsonl"):
        assert (run / name).exists(), name
    cfg = load_config(output / "train.yaml")
    assert (cfg.max_steps, cfg.beta, cfg.use_peft) == (settings.steps, settings.beta, True)
    assert json.loads((run / "summary.json").read_text(encoding="utf-8"))["steps"] == settings.steps
    pair = read_jsonl(output / "pairs.jsonl")[0]
    assert pair["judge"] == "python:dpokit.demo.task:judge" and pair["score_chosen"] > pair["score_rejected"]
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "demo-dpo" in html and "grid vibe" in html


def test_no_heldout_prompt_reaches_training(demo_run: tuple[Path, dict, DemoSettings]) -> None:
    """Training prompts come from the task's train split and held-out ones from its held-out split, whose topics
    are disjoint (test_demo_task); pairs are made from training prompts only."""
    output, _, settings = demo_run
    trained = {row["prompt"][-1]["content"] for row in read_jsonl(output / "pairs.jsonl")}
    sampled = [row["prompt"] for row in read_jsonl(output / "prompts" / "train.jsonl")]
    heldout = [row["turns"][0] for row in read_jsonl(output / "prompts" / "heldout.jsonl")]
    assert sampled == task.make_prompts("train", settings.train_prompts, settings.seed)
    assert heldout == task.make_prompts("heldout", settings.heldout_prompts, settings.seed)
    assert trained <= set(sampled) and not set(sampled) & set(heldout)


def test_a_rerun_keeps_its_pairs_and_other_settings_start_over(
    demo_run: tuple[Path, dict, DemoSettings], tiny_model_dir: Path, tmp_path: Path
) -> None:
    output, _, settings = demo_run
    pairs_before = (output / "pairs.jsonl").read_text(encoding="utf-8")
    again = run_demo(output, settings)
    assert (output / "pairs.jsonl").read_text(encoding="utf-8") == pairs_before
    assert again["train_pairs"] == len(pairs_before.splitlines())
    changed = run_demo(output, tiny_settings(tiny_model_dir, train_prompts=4))
    assert len(read_jsonl(output / "prompts" / "train.jsonl")) == 4
    assert changed["train_pairs"] <= 4


def test_an_output_folder_of_something_else_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match="holds other files"):
        run_demo(tmp_path, tiny_settings(tiny_model_dir))
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"
    with pytest.raises(UserError, match="is a file"):
        run_demo(tmp_path / "notes.txt", tiny_settings(tiny_model_dir))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--samples", "1"], "--samples must be at least 2"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--heldout-prompts", "999999"], "more than the"),
    ],
)
def test_bad_knobs_are_one_line_errors(flags: list[str], message: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dpokit", "demo", "--output", str(tmp_path / "out"), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
