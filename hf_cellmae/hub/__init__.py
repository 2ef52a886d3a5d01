"""Sharing on the Hub: model cards generated from a model folder's files, checked one-commit pushes.

- ``write_model_card(model_dir)`` / ``cellmae card MODEL_DIR``: (re)write ``README.md`` from
  ``config.json``, ``training_args.json``, ``trainer_state.json`` and ``eval_results.json``.
- ``check_model_folder(model_dir)``: refuse folders that do not load, hold pickles or secrets.
- ``push_model_folder(model_dir, repo_id)`` / ``cellmae push MODEL_DIR REPO_ID``: one commit.
"""

from ..lazy_exports import lazy_exports

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


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = [
    "FolderCheckError",
    "FolderReport",
    "check_model_folder",
    "push_model_folder",
    "render_model_card",
    "template_path",
    "write_model_card",
]
