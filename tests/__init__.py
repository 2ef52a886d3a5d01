"""hf_cellmae's tests. A package, so that pytest puts the repository root on the import path and tests import
their helpers as `tests.helpers.<module>`, from any folder, without editing sys.path."""
