"""Where sequences lie in a packed or prefix-shared row: plain descriptions that the collator writes and the
attention kernels (`attention.py`, `flex.py`) read, so the data layer never imports a kernel."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """One attention island of a row: `head` tokens attending causally, then `tail` tokens that see the first
    `prefix` tokens of the segment and, causally, each other (a rejected response after prompt + chosen)."""

    row: int
    start: int  # offset of the segment's first token in its row
    head: int
    tail: int = 0
    prefix: int = 0

    @property
    def end(self) -> int:
        return self.start + self.head + self.tail
