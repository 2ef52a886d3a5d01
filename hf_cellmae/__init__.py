"""hf_cellmae: channel-agnostic masked autoencoders for cell microscopy on the Hugging Face stack.

Importing the package registers the model with the transformers Auto classes, so
`AutoModel.from_pretrained(path)` and `AutoImageProcessor.from_pretrained(path)` work on any
hf_cellmae checkpoint. The registration (and torch/transformers) is deferred until transformers is
imported, and the classes below are imported on first use, so the `cellmae` command line starts fast.
"""

from .auto_registration import register_when_transformers_loads
from .lazy_exports import lazy_exports

__version__ = "0.1.0"

# Public names and the module defining each, imported on first access (PEP 562).
_EXPORTS = {
    "PRESETS": ".configuration_cellmae",
    "DECODER_PRESETS": ".configuration_cellmae",
    "CellMAEConfig": ".configuration_cellmae",
    "CellMAEImageProcessor": ".image_processing_cellmae",
    "standardize_channels": ".image_processing_cellmae",
    "CellMAEForPreTraining": ".modeling_cellmae",
    "CellMAEForPreTrainingOutput": ".modeling_cellmae",
    "CellMAEModel": ".modeling_cellmae",
    "CellMAEModelOutput": ".modeling_cellmae",
    "CellMAEPreTrainedModel": ".modeling_cellmae",
    "CellMAEForImageClassification": ".modeling_cellmae_heads",
    "MUNET_PRESETS": ".configuration_munet",
    "CellMUNetConfig": ".configuration_munet",
    "CellMUNetForImageClassification": ".modeling_munet",
    "CellMUNetForPreTraining": ".modeling_munet",
    "CellMUNetForPreTrainingOutput": ".modeling_munet",
    "CellMUNetModel": ".modeling_munet",
    "CellMUNetModelOutput": ".modeling_munet",
    "CellMUNetPreTrainedModel": ".modeling_munet",
    "CellFeatureExtractionPipeline": ".pipeline_cellmae",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


register_when_transformers_loads()

__all__ = [
    "PRESETS",
    "DECODER_PRESETS",
    "CellFeatureExtractionPipeline",
    "CellMAEImageProcessor",
    "standardize_channels",
    "CellMAEConfig",
    "CellMAEForPreTraining",
    "CellMAEForPreTrainingOutput",
    "CellMAEModel",
    "CellMAEModelOutput",
    "CellMAEPreTrainedModel",
    "CellMAEForImageClassification",
    "MUNET_PRESETS",
    "CellMUNetConfig",
    "CellMUNetForImageClassification",
    "CellMUNetForPreTraining",
    "CellMUNetForPreTrainingOutput",
    "CellMUNetModel",
    "CellMUNetModelOutput",
    "CellMUNetPreTrainedModel",
]
