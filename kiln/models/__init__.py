"""kiln's one decoder definition and its Hugging Face interop."""

from kiln.models.kv_cache import KVCache
from kiln.models.transformer import Transformer

__all__ = ["KVCache", "Transformer"]
