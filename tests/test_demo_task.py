"""The demo task: the judge on hand-written answers, the word count, the metric, and the prompt splits."""

from __future__ import annotations

import re

import pytest

from dpokit.demo import task
from dpokit.judges import load_judge

PROMPT = "Describe the ocean in 6 to 11 words."


def topic_of(prompt: str) -> str:
    """The topic a demo prompt was made with, read back through its template."""
    for template in task.TEMPLATES:
        pattern = re.escape(template).replace(r"\{topic\}", "(?P<topic>.+)")
        pattern = pattern.replace(r"\{low\}", r"\d+").replace(r"\{high\}", r"\d+")
        match = re.fullmatch(pattern, prompt)
        if match:
            return match.group("topic")
    raise AssertionError(f"no template makes {prompt!r}")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("The ocean is vast.", 4),
        ("  well-known   facts, 1. and 2.  ", 5),  # hyphenated words and list numbers count once each
        ("Waves - crash ... on rocks!", 4),  # a lone dash or ellipsis is not a word
        ("Sun \U0001f31e shines", 2),  # nor is an emoji
        ("line one\nline two", 4),
        ("", 0),
        ("... -- !!", 0),
    ],
)
def test_count_words(text: str, words: int) -> None:
    assert task.count_words(text) == words


@pytest.mark.parametrize(
    ("response", "score"),
    [
        ("The ocean is deep, blue and full of life.", 1.0),  # 9 words, inside 6..11
        ("The ocean is deep and blue.", 1.0),  # 6 words: the low end counts as inside
        ("The ocean is deep, blue, salty, cold and full of life.", 1.0),  # 11 words: so does the high end
        ("The ocean is a vast body of salt water that covers most of our planet.", 11 / 15),  # 15 words, above
        (" ".join(["word"] * 22), 0.5),  # twice the high end scores a half
        ("Deep and blue.", 3 / 6),  # 3 words, below the low end
        ("Ocean.", 1 / 6),
        ("", 0.0),
        ("?!", 0.0),
    ],
)
def test_judge_scores_hand_written_answers(response: str, score: float) -> None:
    assert task.judge(PROMPT, response) == pytest.approx(score)


def test_judge_reads_both_range_phrasings_and_refuses_prompts_without_one() -> None:
    assert task.word_range("Explain what a clock is, using between 4 and 9 words.") == (4, 9)
    assert task.word_range("In 10 to 15 words, tell me about tea.") == (10, 15)
    assert task.judge("Explain what a clock is, using between 4 and 9 words.", "A clock tells the time.") == 1.0
    # A prompt that asks for no range gets no verdict rather than a made-up score.
    assert task.word_range("Describe the ocean.") is None
    assert task.judge("Describe the ocean.", "The ocean is vast.") is None
    assert task.judge("Describe the ocean in 9 to 3 words.", "The ocean is vast.") is None


def test_in_range_rate_counts_answers_inside_their_range() -> None:
    prompts = [PROMPT, "Tell me one fact about tea in 4 to 9 words.", "Describe snow in 8 to 13 words."]
    answers = ["The ocean is deep, blue and full of life.", "Tea is a drink.", "Snow is cold."]
    # inside (9 in 6..11), inside (4 in 4..9), below (3 < 8)
    assert task.in_range_rate(prompts, answers) == pytest.approx(2 / 3)
    assert task.in_range(PROMPT, "The ocean is deep and blue.")
    assert not task.in_range(PROMPT, "Blue.")
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        task.in_range_rate(prompts[:2], answers[:1])


def test_every_prompt_has_a_range_the_judge_reads_back() -> None:
    for split in task.SPLITS:
        for prompt in task.make_prompts(split, 200, seed=0):
            low, high = task.word_range(prompt)
            assert task.LOWEST <= low and high == low + task.RANGE_WIDTH <= task.HIGHEST
            assert topic_of(prompt) in task.split_topics(split)


def test_topic_splits_partition_the_topics() -> None:
    splits = [set(task.split_topics(split)) for split in task.SPLITS]
    assert len(task.TOPICS) == len(set(task.TOPICS))
    assert set().union(*splits) == set(task.TOPICS)
    assert sum(len(s) for s in splits) == len(task.TOPICS)
    assert [len(s) for s in splits] == [70, 17, 29]


def test_splits_never_share_a_prompt_or_a_topic() -> None:
    prompts = {split: task.make_prompts(split, 300, seed=0) for split in task.SPLITS}
    topics = {split: {topic_of(p) for p in texts} for split, texts in prompts.items()}
    for split, texts in prompts.items():
        assert len(set(texts)) == len(texts)  # no repeats inside a split
        assert topics[split] <= set(task.split_topics(split))
    for a, b in [("train", "validation"), ("train", "heldout"), ("validation", "heldout")]:
        assert not set(prompts[a]) & set(prompts[b])
        assert not topics[a] & topics[b]


def test_prompts_are_deterministic_and_seeds_differ() -> None:
    assert task.make_prompts("train", 50, seed=3) == task.make_prompts("train", 50, seed=3)
    assert task.make_prompts("train", 50, seed=3) != task.make_prompts("train", 50, seed=4)
    # a larger draw from the same seed is not required to extend a smaller one, but the split never moves
    assert task.split_topics("heldout") == task.split_topics("heldout")
    assert task.split_topics("heldout")[:3] == ("the sunrise", "the first day of school", "honey")


def test_asking_for_more_prompts_than_a_split_holds_is_an_error() -> None:
    lows = task.HIGHEST - task.RANGE_WIDTH - task.LOWEST + 1
    available = len(task.TEMPLATES) * len(task.split_topics("validation")) * lows
    assert len(task.make_prompts("validation", available, seed=0)) == available
    with pytest.raises(ValueError, match=f"has {available} distinct prompts"):
        task.make_prompts("validation", available + 1, seed=0)
    with pytest.raises(ValueError, match="unknown split"):
        task.make_prompts("test", 1, seed=0)


def test_generate_can_use_the_task_judge_by_its_spec() -> None:
    judge = load_judge("python:dpokit.demo.task:judge")
    prompt = [{"role": "user", "content": PROMPT}]
    assert judge.score(prompt, ["The ocean is deep and blue.", "Ocean."]) == [1.0, pytest.approx(1 / 6)]
    assert judge.compare(prompt, "Ocean.", "The ocean is deep and blue.") == "B"
