"""The one exception type for mistakes a user can fix, and how the command line shows them.

Raise :class:`UserError` (or a ``ValueError``/``OSError`` whose message names the value and the fix)
for anything the user can correct: a wrong path, flag, channel name or config value. ``cellmae``
prints such an error as one line, ``cellmae COMMAND: error: MESSAGE``, and exits with status 2;
``cellmae --debug COMMAND ...`` shows the traceback instead.

Two helpers build such errors where they are easy to get wrong: ``untrusted_pickle_error`` (a pickle
refused by ``torch.load(weights_only=True)``, worded without torch's advice to load it unsafely) and
``ensure_writable_folder`` (checked before long work starts).
"""

from __future__ import annotations

import tempfile
from pathlib import Path


class UserError(ValueError):
    """A mistake the user can fix; its message says what was wrong (with the value) and what to do."""


# Exceptions that the command line reports as one line (anything else is a bug: full traceback).
USER_FACING_ERRORS = (ValueError, OSError, KeyError, ImportError, RuntimeError)


class UntrustedFileError(UserError):
    """A pickle that asks for more than tensors and plain values (so could run code); it was not loaded."""


def untrusted_pickle_error(path, error: Exception, fix: str) -> UntrustedFileError:
    """The one-line refusal of a pickle that ``torch.load(weights_only=True)`` rejected.

    Names the file and the global it asked for, and says what to do (``fix``). torch's own text is
    dropped on purpose: it suggests retrying with ``weights_only=False``, which would run the code.
    """
    import re

    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    asked = f"it asks for {match.group(1)}" if match else "it holds objects other than tensors and plain values"
    return UntrustedFileError(f"{path} is not trusted: {asked}, which could run code, so it was not loaded; {fix}")


def ensure_writable_folder(folder: str | Path, purpose: str) -> Path:
    """Create ``folder`` if needed and check that a file can be written in it, else raise ``UserError``.

    Commands call it before long work, so a read-only or full output folder fails in seconds with
    the cause and the fix, not as a traceback after the work is done.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".cellmae-write-test-"):
            pass
    except OSError as error:
        raise UserError(
            f"cannot write {purpose} to {folder}: {error.strerror or error}; pass an output folder you can write to "
            "(or fix its permissions / free space) and run again"
        ) from error
    return folder
