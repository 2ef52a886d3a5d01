"""Sharing on the Hub: model cards generated from a model folder's files, checked one-commit pushes.

- ``write_model_card(model_dir)`` / ``cellmae card MODEL_DIR``: (re)write ``README.md`` from
  ``config.json``, ``training_args.json``, ``trainer_state.json`` and ``eval_results.json``.
- ``check_model_folder(model_dir)``: refuse folders that do not load, hold pickles or secrets.
- ``push_model_folder(model_dir, repo_id)`` / ``cellmae push MODEL_DIR REPO_ID``: one commit.
"""

import importlib

# Public names and the module defining each: imported on first use, so `cellmae --help`
# (which imports every stage's commands module) stays fast.
_EXPORTS = {
    "FolderCheckError": ".folder_checks",
    "FolderReport": ".folder_checks",
    "check_model_folder": ".folder_checks",
    "render_model_card": ".model_card",
    "template_path": ".model_card",
    "write_model_card": ".model_card",
    "push_model_folder": ".push",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FolderCheckError",
    "FolderReport",
    "check_model_folder",
    "push_model_folder",
    "render_model_card",
    "template_path",
    "write_model_card",
]
