"""Hugging Face interop: one declarative map per family, and safetensors I/O."""

from kiln.models.hf.bloom import BLOOM
from kiln.models.hf.gpt2 import GPT2
from kiln.models.hf.gpt_bigcode import GPT_BIGCODE
from kiln.models.hf.llama import LLAMA, MISTRAL, QWEN2
from kiln.models.hf.mixtral import MIXTRAL
from kiln.models.hf.qwen2_moe import QWEN2_MOE
from kiln.models.hf.qwen3_moe import QWEN3, QWEN3_MOE
from kiln.models.hf.spec import Family

FAMILIES: dict[str, Family] = {
    f.name: f for f in (GPT2, LLAMA, MISTRAL, QWEN2, BLOOM, GPT_BIGCODE, MIXTRAL, QWEN2_MOE, QWEN3, QWEN3_MOE)
}

__all__ = ["FAMILIES", "Family"]
