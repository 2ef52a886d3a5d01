"""hf_cellmae: channel-agnostic masked autoencoders for cell microscopy on the Hugging Face stack."""

__version__ = "0.1.0"
