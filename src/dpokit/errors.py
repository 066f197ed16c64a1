"""The one exception type for a user's mistake.

A `UserError` is something the user can fix: a missing file, a bad config value, a model that cannot be found.
The CLI prints its message as one line and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in what the user gave us. The message names the input and the fix, in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
