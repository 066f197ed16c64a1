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


class RunStopped(Exception):
    """A run that stopped before its end for a reason it reports (a signal, repeated NaNs), with its exit code.

    The state is saved first, so the run can be resumed; the message says where and how.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
