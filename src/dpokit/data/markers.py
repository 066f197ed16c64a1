"""Prompts that a chat template has rendered already.

Some tools ship their prompts as text with the template's markers in it (NeMo-Aligner's `<extra_id_1>User`,
ChatML's `<|im_start|>`). A text pair is tokenized as written, so such a prompt trains as the text it is; but a
conversational pair (and every `dpokit data prepare` triplet) gets the model's chat template on top, which wraps
the prompt twice. The markers looked for are the special tokens the tokenizer's own template uses and the markers
of the common template families.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dpokit.data import Pair
from dpokit.data.formats import text_of

# Markers of the usual template families: NeMo, ChatML, Llama 3, Llama 2 / Mistral, Gemma, Phi-3 / Zephyr.
KNOWN_MARKERS = (
    "<extra_id_0>",
    "<extra_id_1>",
    "<|im_start|>",
    "<|start_header_id|>",
    "[INST]",
    "<start_of_turn>",
    "<|user|>",
    "<|assistant|>",
)


def template_markers(tokenizer: Any = None) -> tuple[str, ...]:
    """The known markers, and the special tokens that the tokenizer's chat template writes."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return KNOWN_MARKERS
    specials = [str(t) for t in getattr(tokenizer, "all_special_tokens", [])]
    specials += [str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    own = sorted({t for t in specials if len(t) > 1 and t in template})
    return tuple(dict.fromkeys([*own, *KNOWN_MARKERS]))


class MarkerCount:
    """How many prompts (of how many, and how many of those conversational) hold template markers, and which."""

    def __init__(self, markers: tuple[str, ...] = KNOWN_MARKERS) -> None:
        self.markers = markers
        self.prompts = 0
        self.marked = 0
        self.marked_conversational = 0
        self.found: dict[str, None] = {}  # in the order first seen

    def add(self, pairs: Iterable[Pair]) -> None:
        for pair in pairs:
            self.prompts += 1
            text = text_of(pair.prompt)
            hits = [marker for marker in self.markers if marker in text]
            if hits:
                self.marked += 1
                self.marked_conversational += pair.conversational
                self.found.update(dict.fromkeys(hits))

    def warning(self) -> str | None:
        """The sentence to print, or None when no prompt holds a marker."""
        if not self.marked:
            return None
        markers = ", ".join(list(self.found)[:4])
        where = (
            f"{self.marked_conversational} of them are message pairs, which the model's chat template wraps again"
            if self.marked_conversational
            else "as text pairs they are tokenized as written, but `dpokit data prepare` makes message pairs of "
            "them, which the model's chat template would wrap again"
        )
        return (
            f"{self.marked} of {self.prompts} prompts already hold chat-template markers ({markers}): the text was "
            f"rendered with a template; {where}"
        )


def marker_warning(pairs: Iterable[Pair], tokenizer: Any = None) -> str | None:
    count = MarkerCount(template_markers(tokenizer))
    count.add(pairs)
    return count.warning()
