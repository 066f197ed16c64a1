"""Shared fixtures: offline hub, a tiny model folder, small preference files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tiny  # noqa: E402

# other projects' real files, read where they lie (beside the repository) and never copied into it
REAL_DATA = Path(
    os.environ.get("DPOKIT_REAL_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "real-data"
)

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Write a haiku about the sea.",
    "Explain gradient descent in one sentence.",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Llama with a ChatML tokenizer (seed 0)."""
    return tiny.save_tiny(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_ref_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny model with the same tokenizer and different weights (seed 1), for a reference that differs."""
    return tiny.save_tiny(tmp_path_factory.mktemp("tiny-ref-model"), seed=1)


def conversational_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` TRL conversational rows with varied prompt and response lengths, one in three with a system turn."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question = (
            rng.choice(QUESTIONS)
            + " "
            + " ".join(rng.choice(["please", "now", "briefly", "sea"]) for _ in range(rng.randint(0, 6)))
        )
        prompt = [{"role": "user", "content": question}]
        if i % 3 == 0:
            prompt.insert(0, {"role": "system", "content": "Be brief."})
        good = "Sure! Here is the answer. " + " ".join(
            rng.choice(["yes", "eight", "Paris", "waves"]) for _ in range(rng.randint(1, 9))
        )
        bad = "I am not sure, maybe. " + " ".join(
            rng.choice(["no", "six", "Lyon", "fox"]) for _ in range(rng.randint(1, 12))
        )
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", conversational_rows(24))
