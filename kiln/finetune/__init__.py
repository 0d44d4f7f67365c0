"""Finetuning with few parameters: LoRA and prompt tuning applied to a kiln model from outside, their
PEFT-format adapter directories, and the multi-adapter layers that serve many adapters over one base."""

from kiln.finetune.config import LoraConfig, PromptTuningConfig
from kiln.finetune.lora import LoRALinear, apply_lora, merge_lora
from kiln.finetune.peft_format import AdapterWeights, attach_adapter, read_adapter, save_adapter
from kiln.finetune.prompt_tuning import PromptTunedModel, apply_prompt_tuning
from kiln.finetune.trainable import count_trainable_parameters, freeze

__all__ = [
    "AdapterWeights",
    "LoRALinear",
    "LoraConfig",
    "PromptTunedModel",
    "PromptTuningConfig",
    "apply_lora",
    "apply_prompt_tuning",
    "attach_adapter",
    "count_trainable_parameters",
    "freeze",
    "merge_lora",
    "read_adapter",
    "save_adapter",
]
