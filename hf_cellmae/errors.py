"""The one exception type for mistakes a user can fix, and how the command line shows them.

Raise :class:`UserError` (or a ``ValueError``/``OSError`` whose message names the value and the fix)
for anything the user can correct: a wrong path, flag, channel name or config value. ``cellmae``
prints such an error as one line, ``cellmae COMMAND: error: MESSAGE``, and exits with status 2;
``cellmae --debug COMMAND ...`` shows the traceback instead.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; its message says what was wrong (with the value) and what to do."""


# Exceptions that the command line reports as one line (anything else is a bug: full traceback).
USER_FACING_ERRORS = (ValueError, OSError, KeyError, ImportError, RuntimeError)
