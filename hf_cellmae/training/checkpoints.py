"""Resumable checkpoints: written atomically, the newest K kept, `latest` found by scanning.

A checkpoint is a folder `checkpoint-{step}` holding accelerate's `save_state` (model, optimizer,
scheduler, RNG states of every rank), the data position of every rank (`data_state_rank{r}.json`)
and `trainer_state.json`. It is written under a temporary name and renamed when complete, so a crash
while saving never leaves a broken newest checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

PREFIX = "checkpoint-"
_NAME = re.compile(rf"{PREFIX}(\d+)")


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str, root: str | Path) -> Path | None:
    """`"latest"` -> the newest complete checkpoint under `root` (None when there is none); else the path."""
    if spec == "latest":
        checkpoints = list_checkpoints(root)
        return checkpoints[-1] if checkpoints else None
    path = Path(spec)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json); pass 'latest' or a checkpoint-N folder.")
    return path


def save_checkpoint(accelerator, root: str | Path, step: int, data_state: dict, trainer_state: dict, keep: int) -> Path:
    """Save a resumable checkpoint for `step` on every rank (call it on all ranks)."""
    root = Path(root)
    final = root / f"{PREFIX}{step}"
    partial = root / f".partial-{PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    (partial / f"data_state_rank{accelerator.process_index}.json").write_text(json.dumps(data_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)  # atomic on one file system: a checkpoint-N folder is always complete
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_data_state(checkpoint: Path, rank: int) -> dict:
    path = checkpoint / f"data_state_rank{rank}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: this checkpoint was written by fewer ranks. Resume with the same number of processes."
        )
    return json.loads(path.read_text())
