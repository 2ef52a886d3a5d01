"""Options dataclasses as command-line flags: one ``--field`` per field, parsed back into the dataclass.

A command's options live in one dataclass (``data.shards.ShardOptions``, ``evaluation.options.EvaluateOptions``,
``training.arguments.PretrainingArguments``...): its fields give each flag's default, type and help, and the library
function the command calls takes the dataclass whole. This module builds the flags (``add_dataclass_options``) and
reads them back (``options_from_namespace``); ``cli`` and the stages' ``commands`` modules use it, and so does
library code that parses its own arguments (``pretrain``). Only the standard library is imported, so ``--help``
stays fast.
"""

from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
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
        shown = [
            ("--" + option[2:].replace("_", "-")) if option.startswith("--") else option
            for option in action.option_strings
        ]
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
            target.add_argument(
                name, type=parse_bool, nargs="?", const=True, default=default, metavar="{true,false}", help=shown
            )
            if default is True:
                target.add_argument(
                    "--no-" + field.name.replace("_", "-"),
                    dest=field.name,
                    action="store_false",
                    help=f"set {name} false",
                )
            continue
        if typing.get_origin(kind) is list:  # list[str]: --field A B C
            item = (typing.get_args(kind) or (str,))[0]
            target.add_argument(
                name, type=item, nargs="+", default=default, **{"metavar": field.name.upper(), **extra}, help=shown
            )
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


def replace_options(options, settings: dict, spellings: dict | None = None):
    """The dataclass ``options`` with ``settings`` replacing its fields (a new object; ``options`` is not changed).

    A setting is a field's name (``num_workers=1``) or, for the library functions' keyword API, a Python spelling
    in ``spellings``: ``{name: function(value) -> {field: value}}`` (``progress=False`` -> ``{"quiet": True}``).
    Anything else is a ``TypeError`` naming the settings there are.
    """
    import dataclasses

    spellings = spellings or {}
    names = {field.name for field in dataclasses.fields(options)}
    changes = {}
    for key, value in settings.items():
        if key in spellings:
            changes.update(spellings[key](value))
        elif key in names:
            changes[key] = value
        else:
            raise TypeError(
                f"{key!r} is not a setting of {type(options).__name__}; settings are its fields "
                f"and {sorted(spellings)}"
            )
    return dataclasses.replace(options, **changes)
