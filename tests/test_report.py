"""`dpokit report`: the page holds every part of a run, escapes hostile text, and renders in a real browser."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from dpokit.cli import main
from dpokit.verdicts import Game, summarize_by_category, summarize_games

HOSTILE = '<script>window.__pwned = 1; console.error("pwned")</script>'
HOSTILE_IMAGE = '<img src=x onerror="window.__pwned = 2">'


def _metrics_rows(steps: int = 40) -> list[dict]:
    rows = []
    for step in range(2, steps + 1, 2):
        progress = step / steps
        rows.append(
            {
                "step": step,
                "epoch": progress,
                "loss": 0.693 - 0.35 * progress + 0.02 * math.sin(step),
                "learning_rate": 5e-6 * min(1.0, step / 4) * (1 - progress + 0.05),
                "grad_norm": 2.0 - progress,
                "rewards/chosen": 0.4 * progress,
                "rewards/rejected": -0.5 * progress,
                "rewards/accuracies": 0.5 + 0.4 * progress,
                "rewards/margins": 0.9 * progress,
                "logps/chosen": -80 + 3 * progress,
                "logps/rejected": -95 - 6 * progress,
            }
        )
        if step % 10 == 0:
            rows.append(
                {
                    "step": step,
                    "epoch": progress,
                    "eval/loss": 0.70 - 0.3 * progress,
                    "eval/rewards/chosen": 0.3 * progress,
                    "eval/rewards/rejected": -0.4 * progress,
                    "eval/rewards/accuracies": 0.5 + 0.3 * progress,
                    "eval/rewards/margins": 0.7 * progress,
                    "eval/logps/chosen": -81 + 2 * progress,
                    "eval/logps/rejected": -96 - 4 * progress,
                }
            )
    return rows


def _comparison_summary() -> dict:
    outcomes = {"writing": ["model_2"] * 6 + ["tie"] * 2 + ["model_1"] * 2, "math": ["model_2"] * 3 + ["model_1"] * 5}
    games = [
        Game(f"{category}-{i}", 1, g, g, category)
        for category, winners in outcomes.items()
        for i, g in enumerate(winners)
    ]
    games.append(Game("writing-x", 1, "error", "model_2", "writing"))
    return {
        **summarize_games(games),
        "per_category": summarize_by_category(games),
        "mean_length_a": 412.0,
        "mean_length_b": 530.5,
        "length_unit": "characters",
        "longer_answer_won": 0.64,
        "model_a": {"model_id": "smollm2-135m-instruct"},
        "model_b": {"model_id": "dpo-run</td><b>bold</b>"},
        "judge": "python:judges.py:length",
    }


def make_run(folder: Path) -> Path:
    """A run folder as `dpokit train`, `eval`, `compare` and `vibe` leave it, with hostile text in model output."""
    folder.mkdir(parents=True)
    rows = _metrics_rows()
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{not json")  # a torn line must be noted, not break the report
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "config.yaml").write_text(
        "model_name_or_path: builtin:smollm2-135m-instruct\nbeta: 0.1\nlearning_rate: 5.0e-06\n"
        f"lora_target_modules:\n- all-linear\nchat_template: '{HOSTILE}'\n"
    )
    summary = {"steps": 40, "runtime_seconds": 1234.5, "pairs_per_second": 3.2, "peak_memory_gb": 1.25}
    summary["final_metrics"] = {k: v for k, v in rows[-1].items() if k != "step"}
    (folder / "summary.json").write_text(json.dumps(summary))
    stats = {
        "train": {"pairs": 900, "format": "trl", "prompt_tokens": {"p50": 41, "p95": 180, "max": 512}},
        "test": {"pairs": 100},
        "dropped": {"duplicates": 3, "over max_length": 2},
        "warnings": ["chosen is longer than rejected in 71% of pairs", HOSTILE_IMAGE],
    }
    (folder / "data_stats.json").write_text(json.dumps(stats))
    (folder / "eval.json").write_text(json.dumps({"pairs": 100, "rewards/accuracies": 0.71, "rewards/margins": 0.42}))
    (folder / "compare").mkdir()
    (folder / "compare" / "summary.json").write_text(json.dumps(_comparison_summary()))
    vibe = [
        {
            "prompt": "Write a haiku about the sea.",
            "base": "Waves.\nFoam.",
            "aligned": "Waves fold into foam,\nsalt wind",
        },
        {"prompt": "Say something nasty.", "base": HOSTILE, "aligned": f"I would rather not. {HOSTILE_IMAGE}"},
    ]
    (folder / "vibe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vibe))
    return folder


def test_report_shows_every_part_and_escapes_model_text(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = make_run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    page = (run / "report.html").read_text()
    # six training plots and one comparison chart, embedded
    assert page.count("data:image/png;base64,") == 7
    for heading in ("Training curves", "Held-out evaluation", "Comparison: compare", "Vibe check", "Run summary"):
        assert heading in page
    assert "Data statistics" in page and "Resolved configuration" in page
    assert "chosen is longer than rejected in 71% of pairs" in page
    assert "metrics.jsonl: 1 line(s)" in page  # the torn line is reported
    # 16 of 18 writing+math games counted: writing 6/2/2, math 3/0/5 -> wins 9, ties 2, losses 7; 1 failure
    assert re.search(r"<th>all</th><td>9</td><td>2</td><td>7</td><td>1</td><td>50\.0%</td><td>55\.6%</td>", page)
    # no markup from any input survives: no script, no injected element, no broken table
    assert "<script" not in page.lower()
    assert "<img src=x" not in page
    assert "<b>bold</b>" not in page
    assert html_escaped(HOSTILE) in page and html_escaped(HOSTILE_IMAGE) in page
    assert "Content-Security-Policy" in page


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_report_without_metrics_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("beta: 0.1\n")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no metrics" in err
    (run / "metrics.jsonl").write_text("\n{broken\n[1, 2]\n")
    assert main(["report", str(run)]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (run / "report.html").exists()


def test_report_with_metrics_only(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _metrics_rows(4)))
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6
    assert "Vibe check" not in page and "Comparison" not in page


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)


@pytest.fixture
def chromium(tmp_path: Path):
    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("needs the Debian packages chromium and chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def test_report_renders_in_chromium_without_errors(tmp_path: Path, chromium) -> None:
    run = make_run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    chromium.get((run / "report.html").as_uri())
    assert chromium.title == "dpokit report: run"
    errors = [entry for entry in chromium.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    assert errors == []
    assert chromium.execute_script("return window.__pwned === undefined")
    # the hostile text is on the page as text, and every plot decoded to a real image
    body = chromium.find_element("tag name", "body").text
    assert HOSTILE in body
    sizes = chromium.execute_script("return Array.from(document.images).map(i => [i.naturalWidth, i.complete])")
    assert len(sizes) == 7 and all(width > 100 and done for width, done in sizes)
    height = chromium.execute_script("return document.documentElement.scrollHeight")
    chromium.set_window_size(1280, min(height, 6000))
    chromium.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 10_000
