"""Sharing on the Hub: model cards generated from a model folder's files, checked one-commit pushes.

- ``write_model_card(model_dir)`` / ``cellmae card MODEL_DIR``: (re)write ``README.md`` from
  ``config.json``, ``training_args.json``, ``trainer_state.json`` and ``eval_results.json``.
- ``check_model_folder(model_dir)``: refuse folders that do not load, hold pickles or secrets.
- ``push_model_folder(model_dir, repo_id)`` / ``cellmae push MODEL_DIR REPO_ID``: one commit.
"""

from .folder_checks import FolderCheckError, FolderReport, check_model_folder
from .model_card import render_model_card, template_path, write_model_card
from .push import push_model_folder

__all__ = [
    "FolderCheckError",
    "FolderReport",
    "check_model_folder",
    "push_model_folder",
    "render_model_card",
    "template_path",
    "write_model_card",
]
