"""hf_cellmae: channel-agnostic masked autoencoders for cell microscopy on the Hugging Face stack.

Importing the package registers the model with the transformers Auto classes, so
`AutoModel.from_pretrained(path)` and `AutoImageProcessor.from_pretrained(path)` work on any
hf_cellmae checkpoint.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForPreTraining

from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_cellmae import PRESETS, CellMAEConfig
from .image_processing_cellmae import CellMAEImageProcessor, standardize_channels
from .modeling_cellmae import (
    CellMAEForPreTraining,
    CellMAEForPreTrainingOutput,
    CellMAEModel,
    CellMAEModelOutput,
    CellMAEPreTrainedModel,
)
from .pipeline_cellmae import CellFeatureExtractionPipeline

__version__ = "0.1.0"

AutoConfig.register(CellMAEConfig.model_type, CellMAEConfig, exist_ok=True)
AutoModel.register(CellMAEConfig, CellMAEModel, exist_ok=True)
AutoModelForPreTraining.register(CellMAEConfig, CellMAEForPreTraining, exist_ok=True)
AutoImageProcessor.register(CellMAEConfig, image_processor_classes={"pil": CellMAEImageProcessor, "torchvision": CellMAEImageProcessor}, exist_ok=True)
PIPELINE_REGISTRY.register_pipeline(
    "cell-feature-extraction", pipeline_class=CellFeatureExtractionPipeline, pt_model=AutoModel, type="image"
)
# save_pretrained copies the model code next to the weights for trust_remote_code loading.
CellMAEConfig.register_for_auto_class()
CellMAEModel.register_for_auto_class("AutoModel")
CellMAEForPreTraining.register_for_auto_class("AutoModelForPreTraining")
CellMAEImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "PRESETS",
    "CellFeatureExtractionPipeline",
    "CellMAEImageProcessor",
    "standardize_channels",
    "CellMAEConfig",
    "CellMAEForPreTraining",
    "CellMAEForPreTrainingOutput",
    "CellMAEModel",
    "CellMAEModelOutput",
    "CellMAEPreTrainedModel",
]
