"""`cellmae convert-openphenom`: model-level commands."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert-openphenom",
        help="convert Recursion's OpenPhenom weights into an hf_cellmae model folder",
        description="Read OpenPhenom's model.safetensors (a torch pickle, read safely) and write a folder that "
        "AutoModel.from_pretrained loads. The weights stay under Recursion's non-commercial licence.",
    )
    parser.add_argument("src", help="OpenPhenom model.safetensors (or its folder)")
    parser.add_argument("dst", help="output model folder")
    parser.set_defaults(func=_convert)


def _convert(args) -> int:
    from .openphenom import convert_openphenom_folder

    convert_openphenom_folder(args.src, args.dst)
    print(f"Wrote {args.dst}. Load it with: AutoModel.from_pretrained({args.dst!r})  (after `import hf_cellmae`)")
    return 0
