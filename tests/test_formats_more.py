"""The layouts of other training tools, written out by hand: detection, the triplet each row becomes, the non-pair
layouts refused, the empty-response policy, and prompts already rendered with a chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import conversational_rows
from dpokit.cli import main
from dpokit.data import Pair
from dpokit.data.formats import FORMATS, find_format
from dpokit.data.load import load_pairs
from dpokit.data.markers import marker_warning, template_markers
from dpokit.data.rows import EMPTY_KEPT, EMPTY_RESPONSE, IDENTICAL, WRONG_TYPE, Adjusted, Options, RowError
from dpokit.errors import UserError


def u(text: str) -> dict:
    return {"role": "user", "content": text}


def a(text: str) -> dict:
    return {"role": "assistant", "content": text}


def s(text: str) -> dict:
    return {"role": "system", "content": text}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


TOOLS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'

# (row, the layout detected, the columns printed as evidence, prompt, chosen text, rejected text), by hand
LAYOUTS = [
    (  # LLaMA-Factory ranking: multi-turn ShareGPT with a system column, chosen/rejected single {from, value} turns
        {
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello! How can I help?"},
                {"from": "human", "value": "What is 2+2?"},
            ],
            "chosen": {"from": "gpt", "value": "4."},
            "rejected": {"from": "gpt", "value": "5."},
            "system": "Be brief.",
        },
        "sharegpt",
        "columns conversations, chosen, rejected, system",
        [s("Be brief."), u("Hi"), a("Hello! How can I help?"), u("What is 2+2?")],
        "4.",
        "5.",
    ),
    (  # MedicalGPT tool calls: function_call and observation turns, a tools column, responses as texts
        {
            "conversations": [
                {"from": "human", "value": "Weather in Paris?"},
                {"from": "function_call", "value": CALL},
                {"from": "observation", "value": '{"temp": 21}'},
            ],
            "tools": json.dumps(TOOLS),
            "chosen": "It is 21 degrees in Paris.",
            "rejected": "I cannot know that.",
        },
        "sharegpt",
        "columns conversations, chosen, rejected, tools; not used: tools",
        [u("Weather in Paris?"), a(CALL), {"role": "tool", "content": '{"temp": 21}'}],
        "It is 21 degrees in Paris.",
        "I cannot know that.",
    ),
    (  # OpenAI preference fine-tuning, with tools and OpenAI's typed text parts
        {
            "input": {
                "messages": [
                    s("Be brief."),
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}],
                    },
                ],
                "tools": [{"type": "function", "function": TOOLS[0]}],
            },
            "preferred_output": [a("4.")],
            "non_preferred_output": [a("5.")],
        },
        "openai",
        "columns input, preferred_output, non_preferred_output; not used: input.tools",
        [s("Be brief."), u("What is 2+2?")],
        "4.",
        "5.",
    ),
    (  # axolotl's chat-template layout: the prompt in `messages`, single response messages
        {"messages": [u("Hi"), a("Hello!"), u("Bye")], "chosen": a("Goodbye!"), "rejected": a("Whatever.")},
        "messages",
        "columns messages, chosen, rejected",
        [u("Hi"), a("Hello!"), u("Bye")],
        "Goodbye!",
        "Whatever.",
    ),
    (  # LLaMA-Factory v1: two whole conversations with {type: text, value} parts and a loss weight per turn
        {
            "chosen_messages": [
                {"role": "system", "content": [{"type": "text", "value": "Be brief."}], "loss_weight": 0.0},
                {"role": "user", "content": [{"type": "text", "value": "Hi"}], "loss_weight": 0.0},
                {"role": "assistant", "content": [{"type": "text", "value": "Hello!"}], "loss_weight": 0.0},
                {"role": "user", "content": [{"type": "text", "value": "What is 2+2?"}], "loss_weight": 0.0},
                {"role": "assistant", "content": [{"type": "text", "value": "4."}], "loss_weight": 1.0},
            ],
            "rejected_messages": [
                {"role": "system", "content": [{"type": "text", "value": "Be brief."}], "loss_weight": 0.0},
                {"role": "user", "content": [{"type": "text", "value": "Hi"}], "loss_weight": 0.0},
                {"role": "assistant", "content": [{"type": "text", "value": "Hello!"}], "loss_weight": 0.0},
                {"role": "user", "content": [{"type": "text", "value": "What is 2+2?"}], "loss_weight": 0.0},
                {"role": "assistant", "content": [{"type": "text", "value": " 5."}], "loss_weight": 1.0},
            ],
        },
        "chosen-messages",
        "columns chosen_messages, rejected_messages",
        [s("Be brief."), u("Hi"), a("Hello!"), u("What is 2+2?")],
        "4.",
        " 5.",  # kept exactly: no strip
    ),
    (  # MedicalGPT: system, [user, assistant] history pairs, the question
        {
            "system": "Be brief.",
            "history": [["Hi", "Hello!"], ["Are you there?", "Yes."]],
            "question": "What is 2+2?",
            "response_chosen": "4.",
            "response_rejected": "5.",
        },
        "medicalgpt",
        "columns question, response_chosen, response_rejected, system, history",
        [s("Be brief."), u("Hi"), a("Hello!"), u("Are you there?"), a("Yes."), u("What is 2+2?")],
        "4.",
        "5.",
    ),
    (  # MedicalGPT with an empty system text and no history: no system message
        {"system": "", "history": [], "question": "What is 2+2?", "response_chosen": "4.", "response_rejected": "5."},
        "medicalgpt",
        "columns question, response_chosen, response_rejected, system, history",
        [u("What is 2+2?")],
        "4.",
        "5.",
    ),
    (  # NeMo-Aligner: texts already rendered with NeMo's template, kept verbatim
        {
            "prompt": "<extra_id_0>System\n\n<extra_id_1>User\nWhat is 2+2?\n<extra_id_1>Assistant\n",
            "chosen_response": "4.\n<extra_id_1>",
            "rejected_response": "5.\n<extra_id_1>",
        },
        "nemo-aligner",
        "columns prompt, chosen_response, rejected_response",
        [u("<extra_id_0>System\n\n<extra_id_1>User\nWhat is 2+2?\n<extra_id_1>Assistant\n")],
        "4.\n<extra_id_1>",
        "5.\n<extra_id_1>",
    ),
    (  # ColossalChat: {from, content} turns, ShareGPT role names
        {
            "context": [
                {"from": "human", "content": "Hi"},
                {"from": "assistant", "content": "Hello!"},
                {"from": "human", "content": "What is 2+2?"},
            ],
            "chosen": [{"from": "assistant", "content": "4."}],
            "rejected": [{"from": "assistant", "content": "5."}],
        },
        "colossalchat",
        "columns context, chosen, rejected",
        [u("Hi"), a("Hello!"), u("What is 2+2?")],
        "4.",
        "5.",
    ),
]


@pytest.mark.parametrize(("row", "name", "evidence", "prompt", "chosen", "rejected"), LAYOUTS)
def test_each_layout_is_detected_with_its_evidence_and_gives_the_triplet(row, name, evidence, prompt, chosen, rejected):
    fmt = find_format(row)
    assert fmt is not None and (fmt.name, fmt.evidence(row)) == (name, evidence)
    pair = fmt.normalize(row, Options())
    assert isinstance(pair, Pair)
    if name == "nemo-aligner":  # texts stay a standard pair, tokenized as written
        assert pair == Pair(prompt[0]["content"], chosen, rejected)
    else:
        assert pair == Pair(prompt, [a(chosen)], [a(rejected)])


def test_prepare_prints_the_format_and_its_columns_and_writes_the_triplets(tmp_path, capsys):
    for i, (row, name, evidence, prompt, chosen, rejected) in enumerate(LAYOUTS):
        source = write_jsonl(tmp_path / f"in{i}.jsonl", [row])
        out = tmp_path / f"out{i}.jsonl"
        assert main(["data", "prepare", str(source), "--output", str(out), "--test-size", "0"]) == 0
        assert f"(format {name}, detected from {evidence})" in capsys.readouterr().out
        (line,) = out.read_text(encoding="utf-8").splitlines()
        assert json.loads(line) == {"prompt": prompt, "chosen": [a(chosen)], "rejected": [a(rejected)]}


# --- where two layouts could read a row, the more specific wins ------------------------------------------------------

H = "\n\nHuman: What is 2+2?\n\nAssistant: "


@pytest.mark.parametrize(
    ("row", "winner", "loser"),
    [
        ({"conversations": [u("q")], "chosen": a("c"), "rejected": a("r")}, "sharegpt", "implicit"),
        ({"messages": [u("q")], "chosen": a("c"), "rejected": a("r")}, "messages", "implicit"),
        ({"context": [u("q")], "chosen": [a("c")], "rejected": [a("r")]}, "colossalchat", "implicit"),
        ({"system": "s", "question": "q", "chosen": "c", "rejected": "r"}, "orca", "implicit"),
        (
            {"prompt": "q", "chosen": "c", "rejected": "r", "score_chosen": 2, "score_rejected": 1},
            "ultrafeedback-h4",
            "trl",
        ),
        ({"prompt": "q", "completion": "c", "label": True}, "unpaired", None),
        # the same columns (a tie): the one listed first, HH's transcripts before any two texts
        ({"chosen": H + "4.", "rejected": H + "5."}, "hh-rlhf", "implicit"),
    ],
)
def test_the_more_specific_layout_wins(row, winner, loser):
    matching = [fmt.name for fmt in FORMATS.values() if fmt.detect(row)]
    assert winner in matching and (loser is None or loser in matching)
    assert find_format(row).name == winner


# --- columns: mapping the role and content fields too ----------------------------------------------------------------


def test_columns_read_any_message_fields(tmp_path):
    # speaker/text are read without a mapping, like from/value; `agent` is an assistant
    row = {
        "conversation": [
            {"speaker": "human", "text": "Hi"},
            {"speaker": "agent", "text": "Hello!"},
            {"speaker": "human", "text": "Bye"},
        ],
        "better": {"speaker": "agent", "text": "Goodbye!"},
        "worse": {"speaker": "agent", "text": "Whatever."},
    }
    columns = {"prompt": "conversation", "chosen": "better", "rejected": "worse"}
    expected = Pair([u("Hi"), a("Hello!"), u("Bye")], [a("Goodbye!")], [a("Whatever.")])
    assert FORMATS["columns"].normalize(row, Options(columns=columns)) == expected
    # other field names come through `role` and `content`
    odd = {
        "dialog": [{"who": "user", "says": "Hi"}],
        "good": {"who": "assistant", "says": "4."},
        "bad": [{"who": "assistant", "says": "5."}],
    }
    mapping = {"prompt": "dialog", "chosen": "good", "rejected": "bad", "role": "who", "content": "says"}
    assert FORMATS["columns"].normalize(odd, Options(columns=mapping)) == Pair([u("Hi")], [a("4.")], [a("5.")])
    with pytest.raises(RowError, match="must be an object with a role"):
        FORMATS["columns"].normalize(odd, Options(columns={"prompt": "dialog", "chosen": "good", "rejected": "bad"}))
    path = write_jsonl(tmp_path / "custom.jsonl", [row])
    assert main(["data", "prepare", str(path), "--output", str(tmp_path / "o.jsonl"), "--test-size", "0",
                 "--columns", json.dumps(columns)]) == 0  # fmt: skip


def test_content_parts_that_are_not_text_make_a_bad_row():
    row = {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}],
        "chosen": a("c"),
        "rejected": a("r"),
    }
    with pytest.raises(RowError, match="content part 0 is 'image_url', not text") as e:
        FORMATS["messages"].normalize(row, Options())
    assert e.value.kind == WRONG_TYPE


# --- not pairs: refused with what they are and what to do -------------------------------------------------------------

NOT_PAIRS = [
    ([{"prompt": "The sky is", "completion": " blue.", "label": True}] * 2, "unpaired"),
    ([{"prompt": [u("Sky colour?")], "completion": [a("Blue.")], "label": False}] * 2, "unpaired"),
    ([{"messages": [u("Sky colour?"), a("Blue.")], "label": True}] * 2, "unpaired"),
    ([{"text": "<extra_id_1>User\nSky?\n<extra_id_1>Assistant\nBlue.", "label": [-100, 4, 3.5]}] * 2, "scored"),
    ([{"prompt": "Sky colour?", "response": "Blue.", "helpfulness": 4, "correctness": 4}] * 2, "scored"),
]


@pytest.mark.parametrize(("rows", "name"), NOT_PAIRS)
def test_files_that_hold_no_pairs_are_refused_by_every_command(tmp_path, capsys, tiny_model_dir, rows, name):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    commands = [
        ["data", "prepare", str(path), "--output", str(tmp_path / "o.jsonl")],
        ["data", "inspect", str(path), "--model", str(tiny_model_dir)],
        ["train", f"model_name_or_path={tiny_model_dir}", f"train_data={path}", f"output_dir={tmp_path / 'run'}"],
    ]
    for argv in commands:
        assert main(argv) == 2
        err = capsys.readouterr().err
        (line,) = err.strip().splitlines()[-1:]
        assert line.startswith(f"dpokit: error: {path}: format {name} (columns ")
        assert "DPO needs two responses to the same prompt" in line and "`rated`" in line
        assert "dpokit generate" in line and "Traceback" not in err
    with pytest.raises(UserError, match="DPO needs two responses"):  # named outright, the same refusal
        load_pairs(str(path), data_format=name)


def test_data_formats_lists_every_layout_and_the_refused_ones(capsys):
    assert main(["data", "formats"]) == 0
    out = capsys.readouterr().out
    for name in ("sharegpt", "openai", "messages", "chosen-messages", "medicalgpt", "nemo-aligner", "colossalchat"):
        assert f" {name} " in out
    assert "`unpaired` and `scored` hold no pairs" in out


# --- empty responses: kept, counted, warned and listed ----------------------------------------------------------------


def test_empty_responses_are_kept_and_both_empty_is_a_bad_row():
    row = {"prompt": [u("q")], "chosen": [a("  ")], "rejected": [a("r")]}
    kept = FORMATS["trl"].normalize(row, Options())
    assert kept == Adjusted(
        Pair([u("q")], [a("  ")], [a("r")]), EMPTY_KEPT, "chosen response is empty; kept as given", EMPTY_RESPONSE
    )
    for layout, both in [
        ("trl", {"prompt": "q", "chosen": "", "rejected": "\n"}),
        ("medicalgpt", {"question": "q", "response_chosen": "", "response_rejected": ""}),
    ]:
        with pytest.raises(RowError, match="both empty") as e:
            FORMATS[layout].normalize(both, Options())
        assert e.value.kind == IDENTICAL


def test_train_runs_on_data_with_an_empty_response_and_says_so(tmp_path, capsys, tiny_model_dir):
    rows = conversational_rows(6)
    rows[3]["rejected"] = [a("")]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    argv = ["train", f"model_name_or_path={tiny_model_dir}", f"train_data={data}", f"output_dir={out}", "max_steps=1"]
    assert main([*argv, "bf16=false", "per_device_train_batch_size=2"]) == 0
    printed = capsys.readouterr().err  # the run's console writes to stderr
    assert "train data: 6 pairs to train on" in printed
    warning = "1 pair with an empty chosen or rejected response, kept as given (TRL trains on them too); listed in"
    assert f"train data warning: {warning} {out / 'pairs.rejected.jsonl'}" in printed
    (note,) = [json.loads(line) for line in (out / "pairs.rejected.jsonl").read_text().splitlines()]
    assert (note["origin"], note["kind"], note["reason"]) == (
        f"{data}:4",
        "empty response",
        "rejected response is empty; kept as given",
    )
    stats = json.loads((out / "data_stats.json").read_text())["train"]
    assert (stats["pairs"], stats["bad_rows"], stats["quality"]["empty_responses"]) == (6, 0, 1)


# --- prompts rendered with a chat template already --------------------------------------------------------------------


def test_prompts_holding_template_markers_are_warned_about(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    markers = template_markers(tokenizer)
    assert markers[:2] == ("<|im_end|>", "<|im_start|>")  # the tiny tokenizer's ChatML markers first
    chatml = Pair([u("<|im_start|>user\nWhat is 2+2?<|im_end|>\n")], [a("4.")], [a("5.")])
    plain = Pair([u("What is 2+2?")], [a("4.")], [a("5.")])
    nemo = Pair("<extra_id_1>User\nWhat is 2+2?\n<extra_id_1>Assistant\n", "4.", "5.")
    warning = marker_warning([chatml, plain], tokenizer)
    assert warning.startswith("1 of 2 prompts already hold chat-template markers (<|im_end|>, <|im_start|>)")
    assert "1 of them are message pairs, which the model's chat template wraps again" in warning
    assert "tokenized as written" in marker_warning([nemo, plain])
    assert marker_warning([plain]) is None


def test_the_columns_key_takes_role_and_content(tmp_path):
    from dpokit.config import load_config

    mapping = "columns={prompt: dialog, chosen: good, rejected: bad, role: who, content: says}"
    cfg = load_config(None, [mapping, f"output_dir={tmp_path}"])
    assert cfg.columns == {"prompt": "dialog", "chosen": "good", "rejected": "bad", "role": "who", "content": "says"}
    with pytest.raises(UserError, match="columns"):
        load_config(None, ["columns={chosen: good, rejected: bad, speaker: who}", f"output_dir={tmp_path}"])
