"""docs/architecture.md matches the folders: every path it names exists, every module of the package is named."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
TOP_FOLDERS = ("hf_cellmae/", "scripts/", "tests/", "examples/", "docs/", "model_cards/", ".ci/")

# Modules that other branches of issue 23 add in parallel: named in the doc before they land here.
# Empty this set once they are merged (the first test then requires them to exist).


def named_paths() -> set[str]:
    """Every `path` in backquotes that starts at a top folder of the repository."""
    quoted = re.findall(r"`([^`\s]+)`", DOC.read_text())
    return {path for path in quoted if path.startswith(TOP_FOLDERS)}


def test_every_path_the_architecture_doc_names_exists():
    missing = sorted(path for path in named_paths() if not (ROOT / path).exists())
    assert not missing, f"docs/architecture.md names paths that are not in the repository: {missing}"


def test_every_module_and_subpackage_of_hf_cellmae_is_in_the_architecture_doc():
    package = ROOT / "hf_cellmae"
    modules = {p.relative_to(ROOT).as_posix() for p in package.rglob("*.py") if p.name != "__init__.py"}
    subpackages = {
        p.parent.relative_to(ROOT).as_posix() + "/" for p in package.rglob("__init__.py") if p.parent != package
    }
    unnamed = sorted((modules | subpackages) - named_paths())
    assert not unnamed, f"docs/architecture.md does not describe: {unnamed}"
