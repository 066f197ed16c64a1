"""Every layout normalizes to the same triplet for the same content; malformed rows are reported with their kind."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dpokit.data import Pair
from dpokit.data.dataset_layouts import parse_hh
from dpokit.data.formats import FORMATS, get_format
from dpokit.data.load import load_pairs
from dpokit.data.rows import (
    CONTRADICTING_SCORES,
    DIFFER_EARLY,
    EMPTY_KEPT,
    EMPTY_RESPONSE,
    EMPTY_TEXT,
    IDENTICAL,
    LAST_TURN_NOT_ASSISTANT,
    MISSING_COLUMN,
    NO_SHARED_PROMPT,
    ROLES_OUT_OF_ORDER,
    TIED,
    TOO_FEW_RESPONSES,
    TRIMMED,
    UNDER_MARGIN,
    WRONG_TYPE,
    Adjusted,
    Dropped,
    Options,
    RowError,
    split_texts,
    to_conversational,
)
from dpokit.errors import UserError

Q, GOOD, BAD, MID = "What is the capital of France?", "Paris.", "Lyon, I think.", "Marseille?"
SYSTEM = "You answer in one word."


def u(text: str) -> dict:
    return {"role": "user", "content": text}


def a(text: str) -> dict:
    return {"role": "assistant", "content": text}


EXPECTED = {"prompt": [u(Q)], "chosen": [a(GOOD)], "rejected": [a(BAD)]}

# The same preference (Q: GOOD over BAD) in every layout, with the columns the public datasets carry.
LAYOUTS = {
    "trl": {"prompt": [u(Q)], "chosen": [a(GOOD)], "rejected": [a(BAD)]},
    "implicit": {"chosen": [u(Q), a(GOOD)], "rejected": [u(Q), a(BAD)]},
    "hh-rlhf": {"chosen": f"\n\nHuman: {Q}\n\nAssistant: {GOOD}", "rejected": f"\n\nHuman: {Q}\n\nAssistant: {BAD}"},
    "ultrafeedback-argilla": {
        "source": "evol_instruct",
        "prompt": Q,
        "chosen": [u(Q), a(GOOD)],
        "chosen-rating": 5.0,
        "chosen-model": "m1",
        "rejected": [u(Q), a(BAD)],
        "rejected-rating": 2.0,
        "rejected-model": "m2",
    },
    "ultrafeedback-h4": {
        "prompt": Q,
        "prompt_id": "abc",
        "chosen": [u(Q), a(GOOD)],
        "rejected": [u(Q), a(BAD)],
        "messages": [u(Q), a(GOOD)],
        "score_chosen": 8.0,
        "score_rejected": 5.0,
    },
    "orca": {"system": "", "question": Q, "chosen": GOOD, "rejected": BAD},
    "stack-exchange": {"qid": 7, "question": Q, "date": "2020-01-01", "response_j": GOOD, "response_k": BAD},
    "rated": {"prompt": Q, "responses": [MID, GOOD, BAD], "scores": [5, 9, 1]},
}
# More shapes of the same content, with the format they must be detected as.
VARIANTS = [
    ("trl", {"prompt": Q, "chosen": GOOD, "rejected": BAD}),  # standard: texts, no chat template
    ("trl", {"prompt": Q, "chosen": [a(GOOD)], "rejected": [a(BAD)]}),  # text prompt, message responses
    (
        "rated",  # UltraFeedback raw: fine-grained_score is preferred to overall_score
        {
            "instruction": Q,
            "completions": [
                {"model": "m1", "response": BAD, "fine-grained_score": 1.5, "overall_score": 9},
                {"model": "m2", "response": GOOD, "fine-grained_score": 4.75, "overall_score": 2},
                {"model": "m3", "response": MID, "fine-grained_score": 3.0, "overall_score": 5},
            ],
        },
    ),
    ("rated", {"question": Q, "responses": [{"text": BAD, "score": 0.1}, {"text": GOOD, "score": 0.9}]}),
    ("ultrafeedback-argilla", {"prompt": Q, "chosen": GOOD, "rejected": BAD, "chosen_rating": 4, "rejected_rating": 1}),
    (
        "ultrafeedback-h4",
        {"prompt": Q, "chosen": [a(GOOD)], "rejected": [a(BAD)], "score_chosen": 2, "score_rejected": 1},
    ),
]


def write(path: Path, rows: list[dict]) -> Path:
    """One file of rows, in the type its suffix names."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


CASES = [(name, row) for name, row in LAYOUTS.items()] + VARIANTS


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
@pytest.mark.parametrize("name,row", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_round_trip_every_layout_gives_the_same_triplet(tmp_path, suffix, name, row):
    loaded = load_pairs(str(write(tmp_path / f"d{suffix}", [row])))
    assert loaded.format == name
    (pair,) = loaded.pairs
    assert to_conversational(pair).to_dict() == EXPECTED
    assert pair.origin == f"{tmp_path / f'd{suffix}'}:1"


def test_round_trip_by_name_and_through_a_column_mapping(tmp_path):
    for name, row in LAYOUTS.items():
        assert get_format(name).normalize(row, Options()).to_dict() == EXPECTED
    mapped = {"question": [u(Q)], "good": [a(GOOD)], "bad": [a(BAD)]}
    options = Options(columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert FORMATS["columns"].normalize(mapped, options).to_dict() == EXPECTED
    implicit = Options(columns={"chosen": "good", "rejected": "bad"})
    assert FORMATS["columns"].normalize({"good": [u(Q), a(GOOD)], "bad": [u(Q), a(BAD)]}, implicit) == Pair(**EXPECTED)
    path = write(tmp_path / "m.jsonl", [{"question": Q, "good": GOOD, "bad": BAD}])
    (pair,) = load_pairs(str(path), options=options).pairs
    assert pair == Pair(Q, GOOD, BAD, f"{path}:1")  # texts keep TRL's standard meaning


def test_trl_standard_stays_text_and_system_messages_are_kept():
    assert FORMATS["trl"].normalize({"prompt": Q, "chosen": GOOD, "rejected": BAD}, Options()) == Pair(Q, GOOD, BAD)
    orca = FORMATS["orca"].normalize({"system": SYSTEM, "question": Q, "chosen": GOOD, "rejected": BAD}, Options())
    trl = {"prompt": [{"role": "system", "content": SYSTEM}, u(Q)], "chosen": [a(GOOD)], "rejected": [a(BAD)]}
    assert orca.to_dict() == trl == FORMATS["trl"].normalize(trl, Options()).to_dict()


def test_hh_transcripts_become_conversations():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 4"
    assert parse_hh(text, "chosen") == [u("Hi there"), a("Hello!"), u("What is 2+2?"), a("4")]
    row = {"chosen": text, "rejected": text[: -len("4")] + "5"}
    pair = FORMATS["hh-rlhf"].normalize(row, Options())
    assert pair == Pair([u("Hi there"), a("Hello!"), u("What is 2+2?")], [a("4")], [a("5")])
    # an empty response is kept as given, with a note for the side file
    kept = FORMATS["hh-rlhf"].normalize({"chosen": text, "rejected": text[: -len(" 4")]}, Options())
    expected = Pair([u("Hi there"), a("Hello!"), u("What is 2+2?")], [a("4")], [a("")])
    assert kept == Adjusted(expected, EMPTY_KEPT, "rejected response is empty; kept as given", EMPTY_RESPONSE)


# --- the implicit prompt, precisely -----------------------------------------------------------------------------------

U1, A1, U2 = u("first question"), a("first answer"), u("second question")


@pytest.mark.parametrize(
    "chosen,rejected,trimmed,kind",
    [
        # only the last assistant turn differs: a pair in both modes
        ([U1, A1, U2, a("c")], [U1, A1, U2, a("r")], Pair([U1, A1, U2], [a("c")], [a("r")]), None),
        # they differ at an earlier assistant turn: rejected, or trimmed to it
        ([U1, a("c1"), U2, a("c2")], [U1, a("r1"), U2, a("r2")], Pair([U1], [a("c1")], [a("r1")]), DIFFER_EARLY),
        ([U1, a("c1"), U2, a("c2")], [U1, a("r1")], Pair([U1], [a("c1")], [a("r1")]), DIFFER_EARLY),
        # never a pair: different user turns, no shared start, one ends in the shared part, identical
        ([U1, A1, u("x"), a("c")], [U1, A1, u("y"), a("r")], None, DIFFER_EARLY),
        ([u("x"), a("c")], [u("y"), a("r")], None, NO_SHARED_PROMPT),
        ([U1, A1], [U1, A1, U2, a("r")], None, NO_SHARED_PROMPT),
        ([U1, A1], [U1, A1], None, IDENTICAL),
        # the shared prompt must end on a user turn
        ([U1, A1, a("c")], [U1, A1, a("r")], None, ROLES_OUT_OF_ORDER),
    ],
)
def test_implicit_conversations(chosen, rejected, trimmed, kind):
    row = {"chosen": chosen, "rejected": rejected}
    for mode in ("reject", "trim"):
        expect_pair = trimmed is not None and (kind is None or mode == "trim")
        if expect_pair:
            result = FORMATS["implicit"].normalize(row, Options(multi_turn=mode))
            assert result == (trimmed if kind is None else Adjusted(trimmed, TRIMMED))
        else:
            with pytest.raises(RowError) as e:
                FORMATS["implicit"].normalize(row, Options(multi_turn=mode))
            assert e.value.kind == kind


@pytest.mark.parametrize(
    "chosen,rejected,expected",
    [
        ("The answer is four", "The answer is five", ("The answer is", " four", " five")),
        ("The answer is 4", "The answer is 5", ("The answer is", " 4", " 5")),
        ("Q: hi\n\nA: yes", "Q: hi\n\nA: yes, sure", ("Q: hi\n\nA:", " yes", " yes, sure")),
    ],
)
def test_implicit_texts_split_at_a_word_boundary(chosen, rejected, expected):
    assert split_texts(chosen, rejected) == Pair(*expected)


def test_implicit_texts_without_a_shared_start_are_rejected():
    for chosen, rejected, kind in [("yes", "no", NO_SHARED_PROMPT), ("Same text", "Same text", IDENTICAL)]:
        with pytest.raises(RowError) as e:
            split_texts(chosen, rejected)
        assert e.value.kind == kind


# --- scores -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores,margin,expected",
    [
        ([3, 3, 3], 0.0, Dropped(TIED)),
        ([5, 4.5], 0.5, Dropped(UNDER_MARGIN)),  # the gap must be above the margin
        ([5, 4.5], 0.4, Pair([u(Q)], [a("r0")], [a("r1")])),
        (["2", "7.5", "1"], 0.0, Pair([u(Q)], [a("r1")], [a("r2")])),  # numbers as text, as CSV holds them
        ([1, 9, 9, 1], 0.0, Pair([u(Q)], [a("r1")], [a("r0")])),  # the first of equal bests and worsts
        ([4], 0.0, Dropped(TOO_FEW_RESPONSES)),
    ],
)
def test_rated_responses_pair_best_against_worst(scores, margin, expected):
    row = {"prompt": Q, "responses": [f"r{i}" for i in range(len(scores))], "scores": scores}
    assert FORMATS["rated"].normalize(row, Options(min_score_margin=margin)) == expected


def test_binarized_scores_ties_dropped_and_contradictions_rejected():
    row = dict(LAYOUTS["ultrafeedback-h4"], score_chosen=5.0, score_rejected=5.0)
    assert FORMATS["ultrafeedback-h4"].normalize(row, Options()) == Dropped(TIED)
    row = dict(LAYOUTS["ultrafeedback-argilla"], **{"chosen-rating": 1.0})
    with pytest.raises(RowError, match="chosen-rating 1 is below rejected-rating 2") as e:
        FORMATS["ultrafeedback-argilla"].normalize(row, Options())
    assert e.value.kind == CONTRADICTING_SCORES


def test_dropped_and_trimmed_rows_are_counted(tmp_path):
    rows = [
        {"prompt": Q, "responses": ["x", "y"], "scores": [1, 1]},
        {"prompt": Q, "responses": ["x", "y"], "scores": [2, 1]},
        {"prompt": Q, "responses": ["x"], "scores": [1]},
    ]
    loaded = load_pairs(str(write(tmp_path / "r.jsonl", rows)))
    assert loaded.format == "rated" and len(loaded.pairs) == 1 and loaded.rows == 3
    assert loaded.counts == {TIED: 1, TOO_FEW_RESPONSES: 1}
    multi = [{"chosen": [U1, a("c1"), U2, a("c2")], "rejected": [U1, a("r1"), U2, a("r2")]}] * 2
    loaded = load_pairs(str(write(tmp_path / "m.jsonl", multi)), options=Options(multi_turn="trim"))
    assert loaded.counts == {TRIMMED: 2} and loaded.pairs[0].to_dict() == {
        "prompt": [U1],
        "chosen": [a("c1")],
        "rejected": [a("r1")],
    }


# --- bad rows ---------------------------------------------------------------------------------------------------------

GOOD_ROW = {"prompt": Q, "chosen": GOOD, "rejected": BAD}


@pytest.mark.parametrize(
    "bad,kind,reason",
    [
        ({"prompt": Q, "chosen": GOOD}, MISSING_COLUMN, "missing column 'rejected'"),
        ({"prompt": Q, "chosen": 5, "rejected": BAD}, WRONG_TYPE, "column 'chosen' must be text, got int"),
        ({"prompt": " ", "chosen": GOOD, "rejected": BAD}, EMPTY_TEXT, "column 'prompt' is empty"),
        ({"prompt": Q, "chosen": "", "rejected": " "}, IDENTICAL, "chosen and rejected responses are both empty"),
        (
            {"prompt": [u(Q), a("x")], "chosen": [a(GOOD)], "rejected": [a(BAD)]},
            ROLES_OUT_OF_ORDER,
            "the prompt must end with a user turn",
        ),
        (
            {"prompt": [u(Q)], "chosen": [a(GOOD), u("more")], "rejected": [a(BAD)]},
            LAST_TURN_NOT_ASSISTANT,
            "last turn of chosen is not an assistant turn",
        ),
        (
            {"prompt": [u(Q)], "chosen": [{"role": "robot", "content": GOOD}], "rejected": [a(BAD)]},
            ROLES_OUT_OF_ORDER,
            "unknown role 'robot'",
        ),
    ],
)
def test_bad_rows_are_reported_with_file_row_kind_and_reason(tmp_path, bad, kind, reason):
    path = write(tmp_path / "d.jsonl", [GOOD_ROW, bad, GOOD_ROW])
    loaded = load_pairs(str(path), max_bad_rows=1)
    assert len(loaded.pairs) == 2
    ((bad_row),) = loaded.bad_rows
    assert (bad_row.origin, bad_row.kind) == (f"{path}:2", kind)
    assert reason in bad_row.reason
    side = [json.loads(line) for line in Path(loaded.rejected_file).read_text().splitlines()]
    assert side == [{"origin": f"{path}:2", "reason": bad_row.reason, "kind": kind, "row": bad}]


def test_more_bad_rows_than_allowed_is_one_line_naming_the_first_and_the_side_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\nnot json\n" + json.dumps({"prompt": Q, "chosen": GOOD}) + "\n")
    with pytest.raises(UserError) as e:
        load_pairs(str(path), rejected_dir=tmp_path / "out")
    message = str(e.value)
    assert message.startswith(f"{path}:2: invalid JSON")
    assert "(and 1 more bad rows)" in message and str(tmp_path / "out" / "d.rejected.jsonl") in message
    assert len((tmp_path / "out" / "d.rejected.jsonl").read_text().splitlines()) == 2


def test_format_is_found_past_a_malformed_first_row(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": Q, "chosen": GOOD}, GOOD_ROW])
    loaded = load_pairs(str(path), max_bad_rows=1)
    assert loaded.format == "trl" and loaded.bad_rows[0].kind == MISSING_COLUMN


def test_unknown_layout_and_unknown_format_name(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"question": Q, "good": GOOD}])
    with pytest.raises(UserError, match=r"unknown format \(columns: good, question\)"):
        load_pairs(str(path))
    with pytest.raises(UserError, match="data format 'nope'"):
        load_pairs(str(path), data_format="nope")
    with pytest.raises(UserError, match="needs the mapping"):
        load_pairs(str(path), data_format="columns")


def test_a_named_format_applies_to_every_row(tmp_path):
    path = write(tmp_path / "d.jsonl", [GOOD_ROW])
    with pytest.raises(UserError, match="missing column 'question'"):
        load_pairs(str(path), data_format="orca")
