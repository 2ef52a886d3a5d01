"""Registering the model with the transformers Auto classes, the first time transformers is imported.

``import hf_cellmae`` must make ``AutoModel.from_pretrained(folder)`` work, yet the ``cellmae``
command line must start without importing torch or transformers (``cellmae --help`` in well under a
second). So ``hf_cellmae/__init__.py`` calls :func:`register_when_transformers_loads`: if
transformers is already imported the classes are registered now, otherwise an import hook registers
them right after ``import transformers`` (or ``from transformers import AutoModel``, or the import of
one of the model modules) finishes.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_registered = False


def register_auto_classes() -> None:
    """Register config, models, image processor and pipeline with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageClassification,
        AutoModelForPreTraining,
    )
    from transformers.pipelines import PIPELINE_REGISTRY

    from .configuration_cellmae import CellMAEConfig
    from .configuration_munet import CellMUNetConfig
    from .image_processing_cellmae import CellMAEImageProcessor
    from .modeling_cellmae import CellMAEForPreTraining, CellMAEModel
    from .modeling_cellmae_heads import CellMAEForImageClassification
    from .modeling_munet import CellMUNetForImageClassification, CellMUNetForPreTraining, CellMUNetModel
    from .pipeline_cellmae import CellFeatureExtractionPipeline

    AutoConfig.register(CellMAEConfig.model_type, CellMAEConfig, exist_ok=True)
    AutoModel.register(CellMAEConfig, CellMAEModel, exist_ok=True)
    AutoModelForPreTraining.register(CellMAEConfig, CellMAEForPreTraining, exist_ok=True)
    AutoModelForImageClassification.register(CellMAEConfig, CellMAEForImageClassification, exist_ok=True)
    # The MU-Net (fixed-channel U-Net MAE) beside it, sharing the image processor.
    AutoConfig.register(CellMUNetConfig.model_type, CellMUNetConfig, exist_ok=True)
    AutoModel.register(CellMUNetConfig, CellMUNetModel, exist_ok=True)
    AutoModelForPreTraining.register(CellMUNetConfig, CellMUNetForPreTraining, exist_ok=True)
    AutoModelForImageClassification.register(CellMUNetConfig, CellMUNetForImageClassification, exist_ok=True)
    for config_class in (CellMAEConfig, CellMUNetConfig):
        AutoImageProcessor.register(
            config_class,
            image_processor_classes={"pil": CellMAEImageProcessor, "torchvision": CellMAEImageProcessor},
            exist_ok=True,
        )
    PIPELINE_REGISTRY.register_pipeline(
        "cell-feature-extraction", pipeline_class=CellFeatureExtractionPipeline, pt_model=AutoModel, type="image"
    )
    # save_pretrained copies the model code next to the weights for trust_remote_code loading.
    CellMAEConfig.register_for_auto_class()
    CellMAEModel.register_for_auto_class("AutoModel")
    CellMAEForPreTraining.register_for_auto_class("AutoModelForPreTraining")
    CellMAEForImageClassification.register_for_auto_class("AutoModelForImageClassification")
    CellMUNetConfig.register_for_auto_class()
    CellMUNetModel.register_for_auto_class("AutoModel")
    CellMUNetForPreTraining.register_for_auto_class("AutoModelForPreTraining")
    CellMUNetForImageClassification.register_for_auto_class("AutoModelForImageClassification")
    CellMAEImageProcessor.register_for_auto_class("AutoImageProcessor")


# Importing any of these triggers the registration, once the outermost of them has finished
# (registering from inside a half-imported model module would import it again, circularly).
_TRIGGERS = (
    "transformers",
    "hf_cellmae.configuration_cellmae",
    "hf_cellmae.modeling_cellmae",
    "hf_cellmae.modeling_cellmae_heads",
    "hf_cellmae.configuration_munet",
    "hf_cellmae.modeling_munet",
    "hf_cellmae.image_processing_cellmae",
    "hf_cellmae.pipeline_cellmae",
)
_importing = 0  # how many trigger modules are being executed right now (nested imports)


class _RegisterAfterImport(importlib.abc.Loader):
    """Wraps a trigger module's own loader: runs it, then registers when no trigger is mid-import."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        global _importing
        _importing += 1
        try:
            self.loader.exec_module(module)
        finally:
            _importing -= 1
        if _importing == 0:
            _remove_hook()
            register_auto_classes()


class _RegistrationImportHook(importlib.abc.MetaPathFinder):
    """Finds the trigger modules as usual, with the registering loader around theirs."""

    _finding = False

    def find_spec(self, name, path=None, target=None):
        if name not in _TRIGGERS or self._finding:
            return None
        self._finding = True  # let the other finders answer for the real spec
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterImport(spec.loader)
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegistrationImportHook)]


def register_when_transformers_loads() -> None:
    """Register now if transformers is imported, else as soon as it (or a model module) is."""
    if "transformers" in sys.modules:
        register_auto_classes()
    elif not any(isinstance(finder, _RegistrationImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegistrationImportHook())
