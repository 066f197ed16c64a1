"""A synthetic preference set with realistic, varied lengths, written as TRL conversational JSONL.

Each row is `{"prompt": [messages...], "chosen": [assistant message], "rejected": [assistant message]}`, the layout
both TRL's DPOTrainer and `dpokit train` read. What matters for a speed benchmark is the shape of the lengths, so
they follow what public preference sets show:

- prompt lengths are long-tailed (log-normal): most prompts are a sentence or two, a few are long multi-paragraph
  requests with pasted context; some carry a system message, some are multi-turn conversations;
- chosen and rejected responses have unequal lengths (log-normal each, chosen a little longer on average, the
  length bias real data has), with paragraphs and numbered lists;
- the words are plain English sentences built from a vocabulary of several topics, so a BPE tokenizer produces
  about the number of tokens per word it does on real text (about 1.3).

Lengths are drawn in words from the target token counts, so the file does not depend on any tokenizer. Everything
follows from `--seed`: the same arguments write the same bytes. The rows come out in random order with respect to
length, so reading them in file order is as good as shuffling them.

    python bench/synthetic.py --pairs 96 --output /tmp/pairs.jsonl
    python bench/synthetic.py --pairs 16 --max-length 2048 --output /tmp/long.jsonl   # for peak memory
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKENS_PER_WORD = 1.3  # BPE tokenizers on English prose, punctuation included


@dataclass(frozen=True)
class LengthProfile:
    """Median tokens and log-normal spread of each part; `cap` bounds the tail of the prompt draw."""

    prompt_median: float
    prompt_sigma: float
    prompt_cap: int
    response_median: float
    response_sigma: float
    response_cap: int
    chosen_over_rejected: float  # median ratio of chosen to rejected length (real sets favour longer answers)


# max_length 1024 (the default of TRL and dpokit): a few prompts and responses run into the limit.
# max_length 2048 (memory): the same shapes scaled so that many pairs fill most of the 2048 tokens.
PROFILES = {
    1024: LengthProfile(70, 1.0, 900, 170, 0.7, 700, 1.3),
    2048: LengthProfile(450, 0.6, 1800, 600, 0.5, 1500, 1.3),
}


TOPICS: dict[str, dict[str, list[str]]] = {
    "cooking": {
        "nouns": "recipe sauce oven dough pan onion garlic broth flour butter crust stew spice kitchen knife "
        "batch loaf marinade vegetable temperature".split(),
        "verbs": "simmer bake whisk season chop roast fold knead reduce taste prepare store".split(),
        "adjectives": "crisp tender golden savory fresh thick smooth bitter rich light".split(),
    },
    "travel": {
        "nouns": "train ticket itinerary hotel station border passport museum harbour route village guide "
        "luggage flight coast market season budget".split(),
        "verbs": "book visit explore cross pack plan reach avoid compare reserve".split(),
        "adjectives": "crowded quiet scenic remote affordable historic rainy busy local cheap".split(),
    },
    "programming": {
        "nouns": "function variable module server request database query cache thread loop test compiler "
        "interface library error branch deployment schema".split(),
        "verbs": "refactor compile deploy cache parse validate debug profile merge index serialize".split(),
        "adjectives": "slow concurrent stale robust verbose readable recursive nested typed lazy".split(),
    },
    "gardening": {
        "nouns": "soil seed root tomato compost leaf hedge bed shade frost weed bulb pot sunlight watering "
        "harvest mulch".split(),
        "verbs": "plant prune water fertilize transplant mulch sow harvest protect divide".split(),
        "adjectives": "sandy moist sunny wilted hardy young dense organic shallow healthy".split(),
    },
    "finance": {
        "nouns": "budget loan interest account savings invoice pension tax mortgage portfolio expense "
        "income fund rate deposit".split(),
        "verbs": "save invest borrow repay track reduce allocate review estimate compare".split(),
        "adjectives": "fixed monthly variable risky stable modest annual hidden gross net".split(),
    },
    "history": {
        "nouns": "empire treaty harbour revolution archive dynasty census cathedral reform trade war "
        "manuscript merchant colony council".split(),
        "verbs": "record found conquer negotiate rebuild abolish document trade govern survive".split(),
        "adjectives": "medieval ancient coastal rival prosperous fragile northern royal rural urban".split(),
    },
}

ADVERBS = "carefully quickly gradually usually rarely often slowly clearly roughly mostly".split()
CONNECTIVES = [
    "However,",
    "In practice,",
    "For example,",
    "As a result,",
    "On the other hand,",
    "In most cases,",
    "First,",
    "Then,",
    "Finally,",
    "Also,",
]
SYSTEM_PROMPTS = [
    "You are a patient assistant who explains things step by step.",
    "You are a concise expert. Answer in plain language and avoid jargon.",
    "You help people plan and solve everyday problems. Be practical and honest about trade-offs.",
    "You are a careful reviewer. Point out mistakes before suggesting improvements.",
]


class Writer:
    """Plain English sentences about one topic, from templates and the topic's vocabulary."""

    def __init__(self, rng: random.Random, topic: str) -> None:
        self.rng = rng
        self.words = TOPICS[topic]

    def pick(self, kind: str) -> str:
        return self.rng.choice(self.words[kind])

    def sentence(self) -> str:
        r, pick = self.rng, self.pick
        templates = [
            lambda: (
                f"The {pick('adjectives')} {pick('nouns')} will {pick('verbs')} the {pick('nouns')} "
                f"{r.choice(ADVERBS)} if you give it enough time."
            ),
            lambda: (
                f"Most people {pick('verbs')} a {pick('adjectives')} {pick('nouns')} before they "
                f"{pick('verbs')} the {pick('nouns')}."
            ),
            lambda: (
                f"{r.choice(CONNECTIVES)} a {pick('nouns')} that is too {pick('adjectives')} makes it harder "
                f"to {pick('verbs')} the {pick('nouns')}."
            ),
            lambda: (
                f"It is worth checking whether the {pick('nouns')} is {pick('adjectives')}, because that "
                f"changes how you {pick('verbs')} everything else."
            ),
            lambda: (
                f"You can {pick('verbs')} the {pick('nouns')} {r.choice(ADVERBS)}, but keep an eye on the "
                f"{pick('adjectives')} {pick('nouns')}."
            ),
            lambda: (
                f"{r.choice(CONNECTIVES)} {r.randint(2, 12)} out of {r.randint(13, 40)} attempts to "
                f"{pick('verbs')} a {pick('nouns')} fail for the same reason."
            ),
        ]
        return r.choice(templates)()

    def question(self) -> str:
        r, pick = self.rng, self.pick
        templates = [
            lambda: (
                f"How do I {pick('verbs')} a {pick('adjectives')} {pick('nouns')} without ruining the {pick('nouns')}?"
            ),
            lambda: (
                f"What is the best way to {pick('verbs')} the {pick('nouns')} when the {pick('nouns')} is "
                f"{pick('adjectives')}?"
            ),
            lambda: f"Why does my {pick('nouns')} always turn out {pick('adjectives')} after I {pick('verbs')} it?",
            lambda: (
                f"Can you explain the difference between a {pick('adjectives')} {pick('nouns')} and a "
                f"{pick('adjectives')} one?"
            ),
            lambda: f"Should I {pick('verbs')} the {pick('nouns')} first or {pick('verbs')} the {pick('nouns')}?",
        ]
        return r.choice(templates)()

    def paragraph(self, words: int) -> str:
        sentences: list[str] = []
        count = 0
        while count < words:
            sentence = self.sentence()
            sentences.append(sentence)
            count += len(sentence.split())
        return " ".join(sentences)

    def text(self, words: int, lists: bool) -> str:
        """About `words` words in paragraphs of 40-120 words, some as a numbered list."""
        blocks: list[str] = []
        left = words
        while left > 0:
            size = min(left, self.rng.randint(40, 120))
            if lists and size > 50 and self.rng.random() < 0.3:
                items = [f"{i}. {self.sentence()}" for i in range(1, self.rng.randint(3, 6) + 1)]
                block = "\n".join(items)
            else:
                block = self.paragraph(size)
            blocks.append(block)
            left -= len(block.split())
        return "\n\n".join(blocks)


def draw_tokens(rng: random.Random, median: float, sigma: float, cap: int, floor: int) -> int:
    return max(floor, min(cap, round(rng.lognormvariate(math.log(median), sigma))))


def words_for(tokens: int) -> int:
    return max(3, round(tokens / TOKENS_PER_WORD))


def make_prompt(rng: random.Random, writer: Writer, tokens: int) -> list[dict[str, str]]:
    """A user request of about `tokens` tokens; long ones paste context before the question."""
    messages: list[dict[str, str]] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if rng.random() < 0.15:  # an earlier exchange, as in multi-turn preference sets
        earlier = min(tokens // 3, 120)
        messages.append({"role": "user", "content": writer.question()})
        messages.append({"role": "assistant", "content": writer.paragraph(words_for(max(earlier, 20)))})
        tokens -= earlier
    question = writer.question()
    context_words = words_for(tokens) - len(question.split())
    if context_words > 12:
        content = f"{writer.text(context_words, lists=False)}\n\n{question}"
    else:
        content = question if rng.random() < 0.5 else f"{writer.sentence()} {question}"
    messages.append({"role": "user", "content": content})
    return messages


def make_pair(rng: random.Random, profile: LengthProfile) -> dict[str, Any]:
    writer = Writer(rng, rng.choice(sorted(TOPICS)))
    prompt_tokens = draw_tokens(rng, profile.prompt_median, profile.prompt_sigma, profile.prompt_cap, 8)
    # Chosen and rejected lengths are correlated (same question) but unequal.
    base = rng.lognormvariate(math.log(profile.response_median), profile.response_sigma)
    ratio = rng.lognormvariate(math.log(profile.chosen_over_rejected), 0.4)
    chosen_tokens = min(profile.response_cap, max(6, round(base * math.sqrt(ratio))))
    rejected_tokens = min(profile.response_cap, max(6, round(base / math.sqrt(ratio))))
    return {
        "prompt": make_prompt(rng, writer, prompt_tokens),
        "chosen": [{"role": "assistant", "content": writer.text(words_for(chosen_tokens), lists=True)}],
        "rejected": [{"role": "assistant", "content": writer.text(words_for(rejected_tokens), lists=True)}],
    }


def generate(pairs: int, seed: int, max_length: int) -> list[dict[str, Any]]:
    """`pairs` rows; the length profile is the one made for `max_length` (1024 or 2048)."""
    if max_length not in PROFILES:
        raise SystemExit(f"--max-length must be one of {', '.join(map(str, PROFILES))}, got {max_length}")
    rng = random.Random(seed)
    return [make_pair(rng, PROFILES[max_length]) for _ in range(pairs)]


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, required=True, help="number of preference pairs")
    parser.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0)")
    parser.add_argument("--max-length", type=int, default=1024, help="length profile: 1024 (default) or 2048")
    parser.add_argument("--output", required=True, help="JSONL file to write")
    args = parser.parse_args()
    write_jsonl(generate(args.pairs, args.seed, args.max_length), args.output)


if __name__ == "__main__":
    main()
