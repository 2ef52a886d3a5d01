"""README.md reads as a user meets it: title first, one spelling per flag, and nothing its commands write is
left for `git status` to list (issue 24, item 8)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_readme_starts_with_its_title():
    assert README.splitlines()[0] == "# hf_cellmae"


def test_every_flag_is_spelled_one_way_in_the_readme():
    flags = set(re.findall(r"--[a-z][a-z0-9_-]*", README))
    both = sorted(flag for flag in flags if "_" in flag and flag.replace("_", "-") in flags)
    assert not both, f"spelled both ways: {both}"


@pytest.mark.slow
def test_the_folders_the_readme_commands_write_are_ignored_by_git():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    written = set()
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in (part.strip() for text in block.splitlines() for part in text.split("&&")):
            if not line.startswith("cellmae "):
                continue
            words = shlex.split(line.rstrip("\\"), comments=True)  # (a continued line ends in a backslash)
            for flag in ("--output-dir", "--out"):
                if flag in words:
                    written.add(words[words.index(flag) + 1])
            if words[1] in ("shard", "convert-openphenom"):  # cellmae shard INPUT OUTPUT_DIR
                written.add(words[3])
            if words[1] == "embed":  # cellmae embed MODEL DATA OUT
                written.add(words[4])
    written = {path.rstrip("/").split("/")[0] for path in written}
    assert {"munet", "wsl", "ft", "runs", "shards", "embeddings", "cellmae-demo"} <= written, written
    ignored = subprocess.run(
        ["git", "check-ignore", *(f"{name}/x" for name in sorted(written))], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert sorted(written - {path.split("/")[0] for path in ignored}) == []
