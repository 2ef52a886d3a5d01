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


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, counting an option's two spellings as one when the user abbreviates it (``--batch``).

    Sub-command parsers are made with the same class (argparse's default ``parser_class``).
    """

    def _get_option_tuples(self, option_string):
        unique = {}
        for option_tuple in super()._get_option_tuples(option_string):  # (action, spelling, ...) per match
            unique.setdefault(id(option_tuple[0]), option_tuple)
        return list(unique.values())


def accept_both_spellings(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Show every long option with dashes (``--output-dir``) and accept it with underscores too.

    accelerate and transformers users type ``--output_dir``; the other commands are spelled
    ``--batch-col``. Each option answers to both, ``--help`` shows the dashed one. Applied to
    sub-command parsers too. argparse looks options up in ``_option_string_actions`` (the only
    way to add a spelling to an existing action), while help and errors read ``option_strings``.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in dict.fromkeys(action.choices.values()):
                accept_both_spellings(subparser)
            continue
        for option in action.option_strings:
            if option.startswith("--"):
                body = option[2:]
                for spelling in ("--" + body.replace("_", "-"), "--" + body.replace("-", "_")):
                    parser._option_string_actions.setdefault(spelling, action)
        shown = [("--" + option[2:].replace("_", "-")) if option.startswith("--") else option for option in action.option_strings]
        action.option_strings = list(dict.fromkeys(shown))
    return parser


def parse_bool(text: str) -> bool:
    """``true/false``, ``yes/no``, ``1/0`` (any case) as a bool; anything else is an argparse error."""
    value = str(text).strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(kind):
    """A converter that reads ``none`` as None and anything else with ``kind`` (for ``int | None`` fields)."""

    def convert(text: str):
        return None if str(text).strip().lower() == "none" else kind(text)

    convert.__name__ = kind.__name__  # argparse names the type in its errors
    return convert


def add_dataclass_options(parser: argparse.ArgumentParser, options_class) -> argparse.ArgumentParser:
    """One ``--field`` per field of the dataclass ``options_class``: its default, type and ``help`` metadata.

    The dataclass is the one place a command's defaults live: ``parser.parse_args`` gives a namespace
    that ``options_class(**vars(namespace))`` (or :func:`options_from_namespace`) turns into the options.
    ``bool`` fields take ``--field``, ``--field true|false`` and, when true by default, ``--no-field``;
    ``X | None`` fields take ``none``; ``list[X]`` fields take one or more values (``--field A B``).
    A field's metadata may also give argparse's ``choices`` and ``metavar``, a ``type`` (the converter of the
    typed text, for a field such as ``dict`` that has none), ``action="store_true"``
    (a switch: ``--field`` alone, false when absent) and ``group`` (the title of the argument group it
    is listed under). The help ends with ``(default: X)`` unless it already says what the default is.
    Only the standard library is imported, so ``--help`` stays fast.
    """
    import dataclasses
    import typing

    hints = typing.get_type_hints(options_class)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(options_class):
        kind = hints[field.name]
        optional = type(None) in typing.get_args(kind)
        if optional:
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        default = field_default(field)
        help_text = field.metadata.get("help", "")
        shown = help_text if "default" in help_text.lower() else f"{help_text} (default: {default})".lstrip()
        name = "--" + field.name.replace("_", "-")
        title = field.metadata.get("group")
        if title and title not in groups:
            groups[title] = parser.add_argument_group(title)
        target = groups[title] if title else parser
        if field.metadata.get("action") == "store_true":
            target.add_argument(name, action="store_true", help=help_text)
            continue
        extra = {key: field.metadata[key] for key in ("choices", "metavar") if key in field.metadata}
        if kind is bool:
            target.add_argument(name, type=parse_bool, nargs="?", const=True, default=default, metavar="{true,false}", help=shown)
            if default is True:
                target.add_argument("--no-" + field.name.replace("_", "-"), dest=field.name, action="store_false",
                                    help=f"set {name} false")
            continue
        if typing.get_origin(kind) is list:  # list[str]: --field A B C
            item = (typing.get_args(kind) or (str,))[0]
            target.add_argument(name, type=item, nargs="+", default=default, **{"metavar": field.name.upper(), **extra}, help=shown)
            continue
        kind = field.metadata.get("type", kind)  # a converter of the typed text, for a type that has none (dict)
        converter = _optional(kind) if optional else kind
        target.add_argument(name, type=converter, default=default, **extra, help=shown)
    return parser


def field_default(field):
    """A dataclass field's default, made by its ``default_factory`` if it has one (None when it has neither)."""
    import dataclasses

    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default if field.default is not dataclasses.MISSING else None


def options_from_namespace(options_class, args: argparse.Namespace):
    """The ``options_class`` dataclass from a sub-command's parsed ``args`` (which also hold its positionals and ``func``)."""
    import dataclasses

    return options_class(**{field.name: getattr(args, field.name) for field in dataclasses.fields(options_class)})


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
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
    original = "\n".join(lines[last_frame + 1:]).strip()
    original = re.sub(r"^[A-Za-z_][\w.]*: ", "", original, count=1)
    return (f"in DataLoader worker process {match.group(1)}: {original}\n"
            "(workers hide the traceback: --debug with --dataloader-num-workers 0 shows it)")


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
        print(f"cellmae {args.command}: error: {one_line(error)} (run `cellmae --debug {args.command} ...` for the traceback)", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = show
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
