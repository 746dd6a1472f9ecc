"""Llama 2: the model and its whole open recipe, from pretraining to an aligned chat model."""

from llama2.checkpoint import Loaded, export_hf, load, save
from llama2.model import ModelArgs, Transformer
from llama2.tokenizer import Tokenizer

__all__ = ["Loaded", "ModelArgs", "Tokenizer", "Transformer", "export_hf", "load", "save"]
__version__ = "0.1.0"
