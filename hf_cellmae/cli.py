"""The ``cellmae`` command line: one sub-command per pipeline stage.

Each stage package (``data``, ``training``, ``evaluation``, ``hub``) owns a ``commands`` module
with a ``register(subparsers)`` function that adds its sub-commands and sets ``func`` on them.
Run ``cellmae --help`` for the list, ``cellmae COMMAND --help`` for one.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import sys

from .errors import USER_FACING_ERRORS
from .options import ArgumentParser, accept_both_spellings

# Stage command modules, in pipeline order (data -> model -> training -> evaluation -> hub).
COMMAND_MODULES = (
    "hf_cellmae.data.commands",
    "hf_cellmae.model_commands",
    "hf_cellmae.training.commands",
    "hf_cellmae.evaluation.commands",
    "hf_cellmae.hub.commands",
    "hf_cellmae.demo",
)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="cellmae",
        description="Channel-agnostic masked autoencoders for cell microscopy on the Hugging Face stack.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"hf_cellmae {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if not _module_exists(name):  # a stage not present in this build
            continue
        importlib.import_module(name).register(subparsers)
    return accept_both_spellings(parser)


# torch re-raises an error from a DataLoader worker with the worker's whole traceback in its message.
_WORKER_ERROR = re.compile(r"Caught \w+ in DataLoader worker process (\d+)\.\s*\nOriginal Traceback")


def _worker_error_message(text: str) -> str | None:
    """The original message of an error torch re-raised from a DataLoader worker (None for other errors).

    The message is what follows the traceback's last frame line (frames are indented), without the
    exception's type name.
    """
    match = _WORKER_ERROR.search(text)
    if match is None:
        return None
    lines = text.splitlines()
    last_frame = max((i for i, line in enumerate(lines) if line.startswith((" ", "\t"))), default=0)
    original = "\n".join(lines[last_frame + 1 :]).strip()
    original = re.sub(r"^[A-Za-z_][\w.]*: ", "", original, count=1)
    return (
        f"in DataLoader worker process {match.group(1)}: {original}\n"
        "(workers hide the traceback: --debug with --dataloader-num-workers 0 shows it)"
    )


def one_line(error: BaseException) -> str:
    """The message of a user error on one line: its lines joined by '; ' (a headline, then reasons,
    mappings or the fix: none of them is dropped). An error from a DataLoader worker gives its original
    message, not the worker's traceback."""
    text = str(error).strip()
    text = _worker_error_message(text) or text
    lines = [line.strip().lstrip("- ") for line in text.splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(error).__name__


def _progress_bar_class():
    """tqdm's bar class when a progress bar may be on screen (tqdm imported), else None."""
    module = sys.modules.get("tqdm")
    return getattr(module, "tqdm", None) if module is not None else None


def _warnings_above_progress_bars(show):
    """`warnings.showwarning` that clears the progress bars first, so a warning gets its own line."""

    def showwarning(*args, **kwargs):
        bars = _progress_bar_class()
        if bars is None:
            return show(*args, **kwargs)
        with bars.external_write_mode(file=sys.stderr):
            return show(*args, **kwargs)

    return showwarning


def _close_progress_bars() -> None:
    """Close the bars a failed command left open, so its error starts on a line of its own."""
    bars = _progress_bar_class()
    for bar in list(getattr(bars, "_instances", ()) or ()):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Commands with their own argument parser (pretrain: HfArgumentParser) take the remaining flags.
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    import warnings

    show = warnings.showwarning
    warnings.showwarning = _warnings_above_progress_bars(show)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"cellmae {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_FACING_ERRORS as error:
        if args.debug:
            raise
        _close_progress_bars()
        print(
            f"cellmae {args.command}: error: {one_line(error)} (run `cellmae --debug {args.command} ...` for the traceback)",
            file=sys.stderr,
        )
        return 2
    finally:
        warnings.showwarning = show
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
