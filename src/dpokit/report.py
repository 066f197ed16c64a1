"""`dpokit report RUN_DIR`: one self-contained HTML page about a training run.

It reads what `dpokit train` wrote into RUN_DIR (metrics.jsonl, config.yaml, summary.json, data_stats.json) and
what the evaluation commands left there (eval.json from `eval`, vibe.jsonl from `vibe`, and any RUN_DIR/*/
summary.json from `compare`, e.g. RUN_DIR/compare), and writes RUN_DIR/report.html with the plots embedded as
PNG data, so the one file can be mailed or archived.

The page is built from text the run does not control: model answers, prompts, data statistics, config values.
Every such string goes through `html.escape`, and a Content-Security-Policy forbids scripts altogether, so an
answer holding `<script>` is shown as text and could not run even if something were missed.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpokit.errors import UserError
from dpokit.jsonl import read_jsonl

REPORT_FILE = "report.html"
METRICS_FILE = "metrics.jsonl"
EVAL_PREFIX = "eval/"
MAX_LIST_ITEMS = 50  # longer lists in data statistics are cut, with a note of how many were left out

# (title, y-axis label, [(metric, legend label)]) for each plot; each is drawn only if the run logged it
CURVES: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Loss", "loss", [("loss", "loss")]),
    (
        "Implicit rewards",
        "beta x log-ratio",
        [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"), ("rewards/margins", "margin")],
    ),
    ("Reward accuracy", "share of pairs", [("rewards/accuracies", "accuracy")]),
    ("Log-probs of responses", "summed log-prob", [("logps/chosen", "chosen"), ("logps/rejected", "rejected")]),
    ("Learning rate", "learning rate", [("learning_rate", "learning rate")]),
    ("Gradient norm", "norm before clipping", [("grad_norm", "grad norm")]),
]
OUTCOME_COLOURS = {"wins": "#2e9e5b", "ties": "#b8b8b8", "losses": "#d1495b"}

Series = dict[str, list[tuple[float, float]]]  # metric -> [(step, value)]


@dataclass
class RunFiles:
    """Everything the report shows, read from the run folder; `notes` lists what could not be read."""

    run_dir: Path
    train: Series
    evals: Series
    config: Any = None
    summary: Any = None
    data_stats: Any = None
    eval_result: Any = None
    comparisons: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    vibe: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- reading ------------------------------------------------------------------------------------------------------


def read_run(run_dir: Path) -> RunFiles:
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; give the output_dir of a `dpokit train` run")
    notes: list[str] = []
    train, evals = read_metrics(run_dir / METRICS_FILE, notes)
    if not train and not evals:
        raise UserError(
            f"run folder {run_dir} has no metrics: {_why_no_metrics(run_dir / METRICS_FILE, notes)}; report a run "
            "that has logged at least one step"
        )
    run = RunFiles(run_dir, train, evals, notes=notes)
    run.config = _read_yaml(run_dir / "config.yaml", notes)
    run.summary = _read_json(run_dir / "summary.json", notes)
    run.data_stats = _read_json(run_dir / "data_stats.json", notes)
    run.eval_result = _read_json(run_dir / "eval.json", notes)
    run.comparisons = _read_comparisons(run_dir, notes)
    run.vibe = _read_vibe(run_dir / "vibe.jsonl", notes)
    return run


def read_metrics(path: Path, notes: list[str]) -> tuple[Series, Series]:
    """(train, eval) series by metric name; eval names lose their `eval/` prefix. Bad lines are noted."""
    train: Series = {}
    evals: Series = {}
    found = read_jsonl(path, lambda row: _is_number(row.get("step")))
    for row in found.rows:
        for key, value in row.items():
            if key in ("step", "epoch") or not _is_number(value):
                continue
            target, name = (evals, key[len(EVAL_PREFIX) :]) if key.startswith(EVAL_PREFIX) else (train, key)
            target.setdefault(name, []).append((float(row["step"]), float(value)))
    if bad := len(found.bad_lines):
        notes.append(f"{path.name}: {bad} line(s) were not metric rows (JSON objects with a numeric step) and left out")
    return train, evals


def _why_no_metrics(path: Path, notes: list[str]) -> str:
    if not path.is_file():
        return f"{path.name} is missing"
    return notes[0] if notes else f"{path.name} holds no logged step"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_json(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        notes.append(f"{path.name} could not be read ({type(e).__name__}) and is left out")
        return None


def _read_yaml(path: Path, notes: list[str]) -> Any:
    import yaml

    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        notes.append(f"{path.name} could not be read ({type(e).__name__}) and is left out")
        return None


def _read_comparisons(run_dir: Path, notes: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Every `dpokit compare` output folder directly inside the run folder, by folder name."""
    found = []
    for summary_file in sorted(run_dir.glob("*/summary.json")):
        summary = _read_json(summary_file, notes)
        if isinstance(summary, dict) and "win_rate_adjusted" in summary:
            found.append((summary_file.parent.name, summary))
    return found


def _read_vibe(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    found = read_jsonl(path, lambda row: all(isinstance(row.get(k), str) for k in ("prompt", "base", "aligned")))
    if bad := len(found.bad_lines):
        notes.append(f"{path.name}: {bad} line(s) without prompt, base and aligned texts were left out")
    return found.rows


# --- plots --------------------------------------------------------------------------------------------------------


def _png(draw: Callable[[Any], None], size: tuple[float, float] = (5.6, 3.4), fixed_margins: bool = True) -> str:
    """A figure drawn by `draw(fig)` as a base64 PNG. Figure objects, not pyplot: no global state, no display.

    Fixed margins fit the curve plots and halve the drawing time; constrained layout (which draws twice) is
    kept for figures whose labels vary in length.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110, layout=None if fixed_margins else "constrained")
    if fixed_margins:
        fig.subplots_adjust(left=0.15, right=0.97, top=0.9, bottom=0.14)
    draw(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def curve_plot(title: str, ylabel: str, metrics: list[tuple[str, str]], train: Series, evals: Series) -> str | None:
    """Train lines and eval points of the given metrics against the step; None when none was logged."""
    if not any(m in train or m in evals for m, _ in metrics):
        return None
    from matplotlib.ticker import FuncFormatter

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        for i, (metric, label) in enumerate(metrics):
            colour = f"C{i}"
            if metric in train:
                steps, values = zip(*train[metric], strict=True)
                ax.plot(steps, values, color=colour, linewidth=1.6, label=f"train {label}")
            if metric in evals:
                steps, values = zip(*evals[metric], strict=True)
                ax.plot(steps, values, color=colour, linestyle="--", marker="o", markersize=4, label=f"eval {label}")
        ax.set_title(title)
        # plain tick labels ("2e-06", "-80") instead of an offset text that collides with the title
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    return _png(draw)


def outcome_plot(summary: dict[str, Any]) -> str:
    """Stacked horizontal bars of B's wins / ties / losses, overall and per category."""
    rows = [("all", summary)] + sorted(summary.get("per_category", {}).items())

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        labels = [name for name, _ in rows][::-1]
        left = [0.0] * len(rows)
        for outcome, colour in OUTCOME_COLOURS.items():
            shares = [_share(s, outcome) for _, s in rows][::-1]
            ax.barh(labels, shares, left=left, color=colour, label=outcome)
            for y, (x0, share) in enumerate(zip(left, shares, strict=True)):
                if share >= 0.06:
                    ax.text(x0 + share / 2, y, f"{100 * share:.0f}%", ha="center", va="center", fontsize=8)
            left = [a + b for a, b in zip(left, shares, strict=True)]
        ax.set_xlim(0, 1)
        ax.axvline(0.5, color="black", linewidth=0.6, linestyle=":")
        ax.set_xlabel("share of judged games")
        ax.legend(ncols=3, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)

    return _png(draw, size=(6.4, 1.2 + 0.38 * len(rows)), fixed_margins=False)


def _share(summary: dict[str, Any], outcome: str) -> float:
    total = sum(int(summary.get(k) or 0) for k in OUTCOME_COLOURS)
    return int(summary.get(outcome) or 0) / total if total else 0.0


# --- HTML ---------------------------------------------------------------------------------------------------------


def esc(value: Any) -> str:
    """The one way text reaches the page."""
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A scalar for display, escaped."""
    if value is None:
        return "&mdash;"
    if isinstance(value, bool):
        return esc(str(value).lower())
    if isinstance(value, float):
        if not math.isfinite(value):
            return esc(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return esc(f"{value:.3e}")
        return esc(f"{value:.4g}" if abs(value) < 1000 else f"{value:,.1f}")
    return esc(value)


def percent(value: Any) -> str:
    return fmt(None) if not _is_number(value) else esc(f"{100 * value:.1f}%")


def render_value(value: Any) -> str:
    """Any JSON-like value as HTML: mappings as key/value tables, lists of records as tables, scalars as text."""
    if isinstance(value, dict):
        if not value:
            return "<span class=muted>(empty)</span>"
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{render_value(v)}</td></tr>" for k, v in value.items())
        return f"<table class=kv>{rows}</table>"
    if isinstance(value, list):
        shown, hidden = value[:MAX_LIST_ITEMS], len(value) - MAX_LIST_ITEMS
        more = f" <span class=muted>(and {hidden} more)</span>" if hidden > 0 else ""
        if shown and all(isinstance(v, dict) for v in shown):
            return _records_table(shown) + more
        if all(not isinstance(v, dict | list) for v in shown):
            return ", ".join(fmt(v) for v in shown) + more
        return "<ol>" + "".join(f"<li>{render_value(v)}</li>" for v in shown) + "</ol>" + more
    return fmt(value)


def _records_table(records: Sequence[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in records for k in r))
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{render_value(r.get(c))}</td>" for c in columns) + "</tr>" for r in records)
    return f"<table class=grid><tr>{head}</tr>{body}</table>"


def _figure(png: str, caption: str) -> str:
    image = f'<img alt="{esc(caption)}" src="data:image/png;base64,{png}">'
    return f"<figure>{image}<figcaption>{esc(caption)}</figcaption></figure>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def headline(run: RunFiles) -> str:
    """The numbers a reader looks for first: last losses, eval reward accuracy and margin, steps."""
    cards = []

    def card(label: str, metric: str, series: Series, show: Callable[[Any], str] = fmt) -> None:
        if series.get(metric):
            step, value = series[metric][-1]
            cards.append(
                f"<div class=card><div class=label>{esc(label)}</div><div class=value>{show(value)}</div>"
                f"<div class=muted>step {fmt(int(step))}</div></div>"
            )

    card("train loss", "loss", run.train)
    card("eval loss", "loss", run.evals)
    card("eval reward accuracy", "rewards/accuracies", run.evals, percent)
    card("eval reward margin", "rewards/margins", run.evals)
    card("train reward accuracy", "rewards/accuracies", run.train, percent)
    for name, summary in run.comparisons:
        value = percent(summary.get("win_rate_adjusted"))
        interval = f"{percent(summary.get('ci_low'))} &ndash; {percent(summary.get('ci_high'))}"
        cards.append(
            f"<div class=card><div class=label>adjusted win rate ({esc(name)})</div><div class=value>{value}</div>"
            f"<div class=muted>95% CI {interval}</div></div>"
        )
    return "<div class=cards>" + "".join(cards) + "</div>" if cards else ""


def curves_section(run: RunFiles) -> str:
    figures = []
    for title, ylabel, metrics in CURVES:
        png = curve_plot(title, ylabel, metrics, run.train, run.evals)
        if png is not None:
            figures.append(_figure(png, title))
    known = {m for _, _, ms in CURVES for m, _ in ms}
    others = sorted((set(run.train) | set(run.evals)) - known)
    extra = f"<p class=muted>Also logged: {esc(', '.join(others))}.</p>" if others else ""
    note = "<p class=muted>Lines are training steps; dashed lines with points are evaluations on held-out pairs.</p>"
    return _section("curves", "Training curves", note + "<div class=figures>" + "".join(figures) + "</div>" + extra)


def comparison_section(name: str, summary: dict[str, Any]) -> str:
    a = (summary.get("model_a") or {}).get("model_id", "A")
    b = (summary.get("model_b") or {}).get("model_id", "B")
    lead = (
        f"<p><b>{esc(b)}</b> (B) against <b>{esc(a)}</b> (A), judged by <code>{esc(summary.get('judge'))}</code> "
        "in both answer orders. B wins a game only when both orders agree; otherwise it is a tie. Judge failures "
        "are counted apart and left out of the rates.</p>"
    )
    rows = [("all", summary)] + sorted((summary.get("per_category") or {}).items())
    head = "<tr><th></th><th>wins</th><th>ties</th><th>losses</th><th>failures</th><th>win rate</th>"
    head += "<th>adjusted win rate</th><th>95% CI</th></tr>"
    body = "".join(
        f"<tr><th>{esc(n)}</th><td>{fmt(s.get('wins'))}</td><td>{fmt(s.get('ties'))}</td>"
        f"<td>{fmt(s.get('losses'))}</td><td>{fmt(s.get('judge_failures'))}</td><td>{percent(s.get('win_rate'))}</td>"
        f"<td>{percent(s.get('win_rate_adjusted'))}</td>"
        f"<td>{percent(s.get('ci_low'))} &ndash; {percent(s.get('ci_high'))}</td></tr>"
        for n, s in rows
    )
    lengths = (
        f"<p>Mean answer length: A {fmt(summary.get('mean_length_a'))}, B {fmt(summary.get('mean_length_b'))} "
        f"{esc(summary.get('length_unit', ''))}. Decisive games won by the longer answer: "
        f"{percent(summary.get('longer_answer_won'))} (near 100% hints that the judge rewards length).</p>"
    )
    chart = _figure(outcome_plot(summary), f"outcomes of {b} against {a}")
    return _section(
        f"compare-{name}", f"Comparison: {name}", lead + chart + f"<table class=grid>{head}{body}</table>" + lengths
    )


def vibe_section(rows: Sequence[dict[str, Any]]) -> str:
    body = "".join(
        f"<tr><td class=text>{esc(r['prompt'])}</td><td class=text>{esc(r['base'])}</td>"
        f"<td class=text>{esc(r['aligned'])}</td></tr>"
        for r in rows
    )
    table = f"<table class='grid vibe'><tr><th>prompt</th><th>base</th><th>aligned</th></tr>{body}</table>"
    return _section(
        "vibe",
        "Vibe check",
        "<p class=muted>The same prompts answered by the base model (adapter off) and the aligned model.</p>" + table,
    )


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
header{background:#1d2330;color:#fff;padding:22px 28px}
header h1{margin:0 0 4px;font-size:22px;font-weight:600}
header .muted{color:#b9c0cc}
nav{margin-top:10px;font-size:14px}nav a{color:#9cc3ff;margin-right:14px;text-decoration:none}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:18px 22px;margin:18px 0}
h2{font-size:18px;margin:0 0 12px}
.muted{color:#6b7383;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:18px 0}
.card{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:12px 16px;min-width:150px}
.card .label{font-size:12px;color:#6b7383;text-transform:uppercase;letter-spacing:.04em}
.card .value{font-size:24px;font-weight:600;margin:2px 0}
.figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:12px}
figure{margin:0}figure img{max-width:100%;height:auto}figcaption{display:none}
table{border-collapse:collapse;font-size:13.5px;margin:6px 0}
th,td{padding:5px 10px;text-align:left;vertical-align:top;border-bottom:1px solid #e6e8ec}
table.grid tr:first-child th{background:#eef0f4}
table.kv th{font-weight:500;color:#3a4254;white-space:nowrap}
table.kv table.kv{margin:0}
table.vibe{width:100%;table-layout:fixed}
td.text{white-space:pre-wrap;overflow-wrap:anywhere}
code{background:#eef0f4;padding:1px 4px;border-radius:3px}
"""


def render(run: RunFiles, generated: str | None = None) -> str:
    """The whole page."""
    from dpokit import __version__

    sections = [curves_section(run)]
    if run.eval_result is not None:
        sections.append(_section("eval", "Held-out evaluation (dpokit eval)", render_value(run.eval_result)))
    sections += [comparison_section(name, summary) for name, summary in run.comparisons]
    if run.vibe:
        sections.append(vibe_section(run.vibe))
    if run.summary is not None:
        sections.append(_section("summary", "Run summary", render_value(run.summary)))
    if run.data_stats is not None:
        sections.append(_section("data", "Data statistics", render_value(run.data_stats)))
    if run.config is not None:
        sections.append(_section("config", "Resolved configuration", render_value(run.config)))
    if run.notes:
        notes = "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in run.notes) + "</ul>"
        sections.append(_section("notes", "Left out of this report", notes))
    links = [("curves", "curves", True), ("eval", "eval", run.eval_result is not None)]
    links += [(f"compare-{name}", f"comparison: {name}", True) for name, _ in run.comparisons]
    nav = "".join(
        f'<a href="#{esc(a)}">{esc(t)}</a>'
        for a, t, present in (
            *links,
            ("vibe", "vibe check", bool(run.vibe)),
            ("summary", "summary", run.summary is not None),
            ("data", "data", run.data_stats is not None),
            ("config", "config", run.config is not None),
        )
        if present
    )
    generated = generated or dt.datetime.now().isoformat(timespec="seconds")
    title = f"dpokit report: {run.run_dir.name}"
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        # no scripts at all, images only from the data embedded here: escaped text is the first line of
        # defence against hostile model output, this policy the second
        "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'\">"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f'<link rel=icon href="data:,"><title>{esc(title)}</title><style>{STYLE}</style></head><body>'
        f"<header><h1>{esc(title)}</h1><div class=muted>{esc(run.run_dir.resolve())} &middot; generated "
        f"{esc(generated)} by dpokit {esc(__version__)}</div><nav>{nav}</nav></header>"
        f"<main>{headline(run)}{''.join(sections)}</main></body></html>\n"
    )


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write RUN_DIR/report.html (whole or not at all) and return its path."""
    folder = Path(run_dir)
    page = render(read_run(folder))
    target = folder / REPORT_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{REPORT_FILE}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def run(args: argparse.Namespace) -> int:
    path = write_report(args.run_dir)
    print(path)
    return 0
