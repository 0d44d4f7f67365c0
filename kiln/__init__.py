"""kiln: pretrain, finetune and serve decoder-only transformer language models from one codebase."""

from kiln.config import ModelConfig, preset
from kiln.errors import KilnError
from kiln.models.hf.io import load_model, read_config, save_model
from kiln.models.transformer import Transformer

__version__ = "0.1.0"

__all__ = ["KilnError", "ModelConfig", "Transformer", "load_model", "preset", "read_config", "save_model"]
