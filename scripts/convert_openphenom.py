#!/usr/bin/env python3
"""Convert Recursion's OpenPhenom weights into an hf_cellmae model folder.

    python scripts/convert_openphenom.py path/to/OpenPhenom/model.safetensors openphenom-hf/

SRC is OpenPhenom's `model.safetensors` (really a torch zip pickle; read with
`torch.load(weights_only=True)`), a real safetensors file, or the folder holding it. DST receives
`model.safetensors` (real safetensors), `config.json`, `preprocessor_config.json` and the model code, so
`AutoModel.from_pretrained(DST)` works with hf_cellmae installed or with `trust_remote_code=True`.
OpenPhenom's weights are under Recursion's non-commercial licence: do not redistribute the result.
"""

from __future__ import annotations

import argparse
import sys

from hf_cellmae.openphenom import convert_openphenom_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="OpenPhenom model.safetensors (torch pickle or safetensors) or its folder")
    parser.add_argument("dst", help="output model folder")
    args = parser.parse_args(argv)
    convert_openphenom_folder(args.src, args.dst)
    print(f"Wrote {args.dst}. Load it with: AutoModel.from_pretrained({args.dst!r})  (after `import hf_cellmae`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
