"""The demo's built-in task: answer in a given number of words, checked by a rule.

Every prompt asks for something short about an everyday topic and sets a word range, e.g. "Describe the ocean in 6
to 11 words." SmolLM2-135M-Instruct mostly misses the range (it keeps talking), but its samples differ in length,
so best-versus-worst pairs exist for almost every prompt and DPO can learn the instruction in minutes on a CPU.
The range has a lower end on purpose: with an upper limit alone, the cheapest way to please the judge is a
one-word answer, and that is what DPO finds.

- The judge (`judge`) counts the words of an answer: 1.0 inside the range, `high / words` above it (twice too long
  scores about 0.5), `words / low` below it, 0.0 for an answer with no words. Graded scores make best and worst
  differ even when no sample hits the range.
- The task metric (`in_range_rate`) is the share of answers whose word count is inside the range.
- Prompts are made from templates, topics and ranges. The topics are split once, by a fixed shuffle, into train,
  validation and held-out topics, so prompts of different splits never share a topic, let alone a text; a run's
  seed only picks which prompts of each split it uses.

`dpokit generate --judge python:dpokit.demo.task:judge` uses the same judge outside the demo.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

SPLITS = ("train", "validation", "heldout")

# Each template holds `{topic}`, `{low}` and `{high}`, and no other number, so the judge can read the range back.
TEMPLATES = (
    "Describe {topic} in {low} to {high} words.",
    "In {low} to {high} words, tell me about {topic}.",
    "What do you like about {topic}? Answer in {low} to {high} words.",
    "Explain what {topic} is, using between {low} and {high} words.",
    "Write a short note of {low} to {high} words about {topic}.",
    "Tell me one fact about {topic} in {low} to {high} words.",
    "Give me a tip related to {topic}, in {low} to {high} words.",
    "Why do people enjoy {topic}? Reply in {low} to {high} words.",
)

TOPICS = (
    "the ocean", "coffee", "a rainy day", "winter", "the moon", "bicycles", "a library", "mountains", "cats",
    "the city at night", "summer holidays", "a forest", "bread", "friendship", "the desert", "trains",
    "a thunderstorm", "gardening", "music", "the sun", "chess", "a river", "snow", "birds", "an old castle",
    "the beach", "tea", "autumn leaves", "a busy market", "the stars", "volcanoes", "a lighthouse", "honey",
    "clouds", "a piano", "the wind", "a small village", "dogs", "spring flowers", "bees", "a campfire", "an island",
    "apples", "a bridge", "books", "a kitchen", "a waterfall", "a museum", "football", "swimming", "a picnic",
    "chocolate", "the rainforest", "a farm", "horses", "a birthday party", "the morning", "cooking", "painting",
    "a school", "the post office", "a zoo", "the harbor", "ice cream", "hiking", "a bakery", "dinosaurs", "a park",
    "a violin", "rice", "a hospital", "photography", "the airport", "a robot", "the internet", "a map", "owls",
    "whales", "a candle", "a snowman", "the countryside", "a cafe", "a rainbow", "dancing", "the weekend",
    "a festival", "pizza", "a lake", "a sailboat", "oranges", "a telescope", "a guitar", "soup",
    "the first day of school", "a clock", "an umbrella", "the sunrise", "elephants", "a warm blanket", "the subway",
    "a marathon", "tomatoes", "a pond", "the mail", "butterflies", "a treehouse", "lemonade", "a bookshop",
    "the harvest", "a rocket", "penguins", "a fountain", "a dentist", "a puzzle", "strawberries", "a bus ride",
)  # fmt: skip

LOWEST = 4  # the smallest lower end of a range
HIGHEST = 16  # the largest upper end
RANGE_WIDTH = 5  # high - low

# Shares of the topics that each split owns; the rest of the list is held out.
TRAIN_SHARE = 0.6
VALIDATION_SHARE = 0.15
# Fixed for good: the topic split must never move, so held-out topics stay unseen by every run and every tuning.
_SPLIT_SHUFFLE_SEED = 20240601

_RANGE_PATTERN = re.compile(r"\b(\d+) to (\d+) words\b|\bbetween (\d+) and (\d+) words\b")


def split_topics(split: str) -> tuple[str, ...]:
    """The topics that belong to `split`; the three splits partition `TOPICS`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}")
    shuffled = list(TOPICS)
    random.Random(_SPLIT_SHUFFLE_SEED).shuffle(shuffled)
    n_train = round(TRAIN_SHARE * len(shuffled))
    n_validation = round(VALIDATION_SHARE * len(shuffled))
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_validation)}
    start, stop = bounds.get(split, (n_train + n_validation, len(shuffled)))
    return tuple(shuffled[start:stop])


def prompt_count(split: str) -> int:
    """How many distinct prompts `split` has: templates x its topics x word ranges."""
    return len(TEMPLATES) * len(split_topics(split)) * (HIGHEST - RANGE_WIDTH - LOWEST + 1)


def make_prompts(split: str, count: int, seed: int) -> list[str]:
    """`count` distinct prompts of `split`, the same for the same seed.

    Each is a template, a topic of the split and a word range, drawn without repetition from all combinations.
    """
    topics = split_topics(split)
    lows = range(LOWEST, HIGHEST - RANGE_WIDTH + 1)
    available = prompt_count(split)
    if not 0 <= count <= available:
        raise ValueError(f"split {split!r} has {available} distinct prompts; asked for {count}")
    rng = random.Random(f"{split}:{seed}")
    prompts = []
    for index in rng.sample(range(available), count):
        template_index, rest = divmod(index, len(topics) * len(lows))
        topic_index, low_index = divmod(rest, len(lows))
        low = lows[low_index]
        prompts.append(TEMPLATES[template_index].format(topic=topics[topic_index], low=low, high=low + RANGE_WIDTH))
    return prompts


def word_range(prompt_text: str) -> tuple[int, int] | None:
    """The range a prompt asks for ("... in 6 to 11 words" -> (6, 11)), or None when it asks for none."""
    match = _RANGE_PATTERN.search(prompt_text)
    if match is None:
        return None
    low, high = (int(g) for g in match.groups() if g is not None)
    return (low, high) if 0 < low <= high else None


def count_words(text: str) -> int:
    """Words as a reader counts them: runs of non-space characters holding at least one letter or digit.

    Punctuation alone ("-", "...") and emoji are not words; "well-known" and "1." are one word each.
    """
    return sum(1 for token in text.split() if any(ch.isalnum() for ch in token))


def judge(prompt_text: str, response_text: str) -> float | None:
    """How well `response_text` keeps the word range of `prompt_text`, from 0.0 to 1.0; higher is better.

    1.0 inside the range; `high / words` above it; `words / low` below it; 0.0 for an answer with no words. None
    (no verdict) for a prompt that asks for no range, so a foreign prompt is counted as unjudged, never guessed.
    """
    bounds = word_range(prompt_text)
    if bounds is None:
        return None
    low, high = bounds
    words = count_words(response_text)
    if words > high:
        return high / words
    return min(1.0, words / low)


def in_range(prompt_text: str, response_text: str) -> bool:
    """Whether an answer's word count is inside its prompt's range: one point of the task metric."""
    return judge(prompt_text, response_text) == 1.0


def in_range_rate(prompts: Sequence[str], responses: Sequence[str]) -> float:
    """The task metric: the share of answers whose word count is inside the prompt's range (0.0 to 1.0)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("no answers to measure")
    return sum(in_range(p, r) for p, r in zip(prompts, responses, strict=True)) / len(prompts)
