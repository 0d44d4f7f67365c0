"""kiln: pretrain, finetune and serve decoder-only transformer language models from one codebase."""

from kiln.config import ModelConfig, preset
from kiln.engine import LLM, AsyncEngine, EngineConfig, SamplingParams
from kiln.errors import KilnError
from kiln.models.hf.io import load_model, read_config, save_model
from kiln.models.transformer import Transformer
from kiln.tokenizer import Tokenizer

__version__ = "0.1.0"


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of an HF model directory (tokenizer.json + tokenizer_config.json)."""
    return Tokenizer.from_dir(path)


__all__ = [
    "LLM",
    "AsyncEngine",
    "EngineConfig",
    "KilnError",
    "ModelConfig",
    "SamplingParams",
    "Tokenizer",
    "Transformer",
    "load_model",
    "load_tokenizer",
    "preset",
    "read_config",
    "save_model",
]
