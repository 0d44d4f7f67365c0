"""Read and write Hugging Face model directories (config.json + safetensors, sharded or not).

kiln never unpickles weights: a directory holding only `pytorch_model.bin` is refused with a message.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kiln.config import ModelConfig
from kiln.errors import KilnError, ModelLoadError
from kiln.kernels.runtime import KernelChoice
from kiln.models.hf import FAMILIES, Family
from kiln.models.hf.quantized import install_quantized, quantized_state, read_quantized, unquantized_linears
from kiln.models.hf.spec import ConfigReader
from kiln.models.transformer import Transformer
from kiln.parsing import parse_dtype, parse_size
from kiln.quant.compressed_tensors import quantization_config

INDEX_NAME = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# -------------------------------------------------------------------------------------------- reading


def read_config(path: str | Path) -> tuple[ModelConfig, Family]:
    """The ModelConfig and family of an HF model directory, without reading any weights."""
    config, family, _ = read_config_values(path)
    return config, family


def read_config_values(path: str | Path) -> tuple[ModelConfig, Family, dict[str, Any]]:
    """`read_config`, plus config.json's values (its `quantization_config`, if any)."""
    directory = Path(path)
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: no such model directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{directory} is not a model directory: it has no config.json "
            "(expected a Hugging Face model directory with config.json and *.safetensors)"
        )
    try:
        values = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{config_path}: not valid JSON ({error})") from None
    model_type = values.get("model_type")
    if model_type not in FAMILIES:
        raise ModelLoadError(
            f"{config_path}: model_type {model_type!r} is not supported; kiln reads {', '.join(FAMILIES)}"
        )
    family = FAMILIES[model_type]
    values_copy = dict(values)
    try:
        return family.config_from_hf(ConfigReader(values, str(config_path))), family, values_copy
    except ModelLoadError:
        raise
    except KilnError as error:  # an invalid combination caught by ModelConfig's validation
        raise ModelLoadError(f"{config_path}: {error}") from None


class CheckpointFiles:
    """Lazy access to the tensors of a directory's safetensors files, by HF tensor name."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.file_of: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        index = directory / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            for name, file in weight_map.items():
                self.file_of[name] = directory / file
            for file in set(self.file_of.values()):
                if not file.is_file():
                    raise ModelLoadError(f"{index} lists {file.name}, which is missing from {directory}")
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise ModelLoadError(self._no_weights_message())
            for file in files:
                for name in self._open(file).keys():
                    self.file_of[name] = file

    def _no_weights_message(self) -> str:
        pickles = [p.name for pattern in PICKLE_PATTERNS for p in self.directory.glob(pattern)]
        if pickles:
            return (
                f"{self.directory} holds only pickle checkpoints ({', '.join(sorted(pickles))}); kiln never "
                "unpickles weights. Convert them to safetensors first, e.g. in Python with transformers: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        return f"{self.directory} has config.json but no *.safetensors weight files"

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as error:
                raise ModelLoadError(
                    f"{file}: not a readable safetensors file (truncated or corrupt?): {error}"
                ) from None
        return self._handles[file]

    def find(self, name: str, base_prefix: str) -> str | None:
        """The stored name for `name`; checkpoints of the bare base model omit `base_prefix`."""
        if name in self.file_of:
            return name
        bare = name.removeprefix(base_prefix)
        return bare if bare != name and bare in self.file_of else None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.file_of[name]).get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        file = self.file_of[name]
        try:
            return self._open(file).get_tensor(name)
        except SafetensorError as error:
            raise ModelLoadError(f"{file}: cannot read tensor {name!r}: {error}") from None


def load_model(
    path: str | Path,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device = "cpu",
    kernels: KernelChoice = "torch",
) -> Transformer:
    """Load an HF model directory of a supported family into a kiln `Transformer` (in eval mode).

    dtype: 'auto' keeps the checkpoint's dtype; or float32/bf16/fp16. Weights are read with safetensors
    straight into the model's parameters; no randomly initialised copy is ever built. kernels: the
    model's switch between torch and the fused Triton kernels ("torch", "triton", or "auto" = Triton on
    CUDA), as `Transformer(kernels=)` takes it.
    """
    directory = Path(path)
    config, family, values = read_config_values(directory)
    target_dtype = parse_dtype(dtype)
    files = CheckpointFiles(directory)
    with torch.device("meta"):
        model = Transformer(config, kernels=kernels)
    quantized, used = read_quantized(values, files, family, config, str(directory / "config.json"))
    expected = {k: v for k, v in model.state_dict().items() if k.removesuffix(".weight") not in quantized}
    state: dict[str, torch.Tensor] = {}
    for hf_name, kiln_names, rule in _applicable(family, config, expected):
        stored = files.find(hf_name, family.base_prefix)
        if stored is None:
            raise ModelLoadError(
                f"{directory}: tensor {hf_name!r} is missing from the checkpoint "
                f"(looked in {', '.join(sorted({f.name for f in files.file_of.values()}))})"
            )
        want = tuple(rule.merge([expected[k] for k in kiln_names], config).shape)  # on meta: shapes only
        got = files.shape(stored)
        if got != want:
            raise ModelLoadError(
                f"{files.file_of[stored]}: tensor {stored!r} has shape {list(got)} but config.json implies "
                f"{list(want)} (vocab_size={config.vocab_size}, hidden_size={config.hidden_size}); "
                "the config and weights do not belong together"
            )
        tensor = files.read(stored)
        target_dtype = target_dtype or tensor.dtype
        for name, part in zip(kiln_names, rule.split(tensor, config), strict=True):
            state[name] = part.to(device=device, dtype=target_dtype).contiguous()
        used.add(stored)
    for hf_names, kiln_name in _applicable_stacks(family, config, expected):
        parts = [
            _read_checked(files, directory, family, name, expected[kiln_name][0].shape) for name in hf_names
        ]
        used.update(files.find(name, family.base_prefix) for name in hf_names)
        state[kiln_name] = torch.stack(parts).to(device=device, dtype=target_dtype or parts[0].dtype)
    _refuse_unknown_tensors(files, used, family, config)
    missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
    assert not unexpected and {k.removesuffix(".weight") for k in missing} <= set(quantized), missing
    install_quantized(model, quantized, target_dtype or next(iter(state.values())).dtype)
    return model.to(device).eval()


def _read_checked(
    files: CheckpointFiles, directory: Path, family: Family, hf_name: str, want: torch.Size
) -> torch.Tensor:
    """One expert's tensor, refused when missing or not the shape the config implies."""
    stored = files.find(hf_name, family.base_prefix)
    if stored is None:
        raise ModelLoadError(f"{directory}: tensor {hf_name!r} is missing from the checkpoint")
    if files.shape(stored) != tuple(want):
        raise ModelLoadError(
            f"{files.file_of[stored]}: tensor {stored!r} has shape {list(files.shape(stored))} but "
            f"config.json implies {list(want)}; the config and weights do not belong together"
        )
    return files.read(stored)


def _applicable_stacks(family: Family, config: ModelConfig, present: dict[str, Any]):
    for stack in family.expert_stacks:
        for hf_names, kiln_name in stack.expand(config.num_layers, config.num_experts):
            if kiln_name in present:
                yield hf_names, kiln_name


def _applicable(family: Family, config: ModelConfig, present: dict[str, Any]):
    for rule in family.weights:
        for hf_name, kiln_names in rule.expand(config.num_layers):
            if all(name in present for name in kiln_names):
                yield hf_name, kiln_names, rule


def _refuse_unknown_tensors(files: CheckpointFiles, used: set[str], family: Family, config: ModelConfig):
    ignore = family.ignore + (("lm_head.weight",) if config.tie_word_embeddings else ())
    for name, file in files.file_of.items():
        if name not in used and not any(pattern in name for pattern in ignore):
            raise ModelLoadError(
                f"{file}: unexpected tensor {name!r} for a {family.name} model with this config.json "
                f"({config.num_layers} layers); the checkpoint does not match its config"
            )


# -------------------------------------------------------------------------------------------- writing


def hf_state_dict(
    model: Transformer, family: Family | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The model's tensors under their Hugging Face names and layouts."""
    config = model.config
    family = family or FAMILIES[config.family]
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for hf_name, kiln_names, rule in _applicable(family, config, state):
        tensor = rule.merge([state[k].detach() for k in kiln_names], config)
        out[hf_name] = tensor.to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
    for hf_names, kiln_name in _applicable_stacks(family, config, state):
        for hf_name, tensor in zip(hf_names, state[kiln_name].detach().unbind(0), strict=True):
            out[hf_name] = tensor.to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
    return out


def hf_config(model: Transformer, family: Family, dtype: torch.dtype) -> dict[str, Any]:
    config = model.config
    if config.attention_pattern != "dense" and family.name != "llama":
        raise KilnError(
            f"this model uses attention_pattern={config.attention_pattern!r}, which the {family.name!r} "
            "family cannot express; save it as family='llama' (kiln writes it under a kiln-specific key)"
        )
    extra = config.extra_hf_config if family.name == config.family else {}
    return {
        **extra,
        "architectures": [family.architecture],
        "model_type": family.name,
        **family.config_to_hf(config),
        "dtype": str(dtype).removeprefix("torch."),
    }


def save_model(
    model: Transformer,
    path: str | Path,
    *,
    family: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    tokenizer=None,
) -> Path:
    """Write `model` as an HF directory that transformers' `from_pretrained` and `kiln.load_model` read.

    family: the HF layout to write (default: the family the model was loaded as, 'llama' for kiln's own).
    Files are written to a temporary directory first and moved into place, so a crash never leaves a
    half-written checkpoint; weight files of an earlier save in the same directory are replaced.
    """
    family_name = family or _default_family(model.config)
    if family_name not in FAMILIES:
        raise ModelLoadError(f"unknown family {family_name!r}; choose one of {', '.join(FAMILIES)}")
    target = FAMILIES[family_name]
    tensors = hf_state_dict(model, target, parse_dtype(dtype))
    saved_dtype = next(iter(tensors.values())).dtype
    config = hf_config(model, target, saved_dtype)
    config.pop("quantization_config", None)  # carried over from a loaded quantized directory
    quantized, scheme = quantized_state(model, target, saved_dtype)
    if scheme is not None:  # kiln.quant layers: the compressed-tensors layout
        tensors.update(quantized)
        config["quantization_config"] = quantization_config(scheme, unquantized_linears(model, target))
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".kiln-save-") as staging:
        staging_dir = Path(staging)
        names = _write_shards(tensors, staging_dir, parse_size(max_shard_size))
        (staging_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for old in [*directory.glob("*.safetensors"), directory / INDEX_NAME]:
            if old.name not in names and old.exists():
                old.unlink()
        for name in [*names, "config.json"]:
            os.replace(staging_dir / name, directory / name)
    if tokenizer is not None:
        tokenizer.save(directory)
        _write_generation_config(directory, tokenizer)
    return directory


def _default_family(config: ModelConfig) -> str:
    """The family a model is saved as: the one it was loaded as; kiln's own models (family 'llama') save
    as Llama (Qwen3 with q/k-norm), or when they have experts as Qwen2-MoE (shared experts), Qwen3-MoE
    (q/k-norm) or Mixtral."""
    if config.family != "llama":
        return config.family
    if not config.num_experts:
        return "qwen3" if config.qk_norm else "llama"
    if config.shared_expert_intermediate_size:
        return "qwen2_moe"
    return "qwen3_moe" if config.qk_norm else "mixtral"


def _write_generation_config(directory: Path, tokenizer) -> None:
    """Stop tokens for generators (transformers, vLLM, kiln) that read generation_config.json."""
    eos = sorted(tokenizer.eos_token_ids)
    values = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text = json.dumps({k: v for k, v in values.items() if v is not None}, indent=2) + "\n"
    (directory / "generation_config.json").write_text(text)


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_bytes: int) -> list[str]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(directory / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_NAME]


def copy_tokenizer_files(source: str | Path, target: str | Path) -> list[str]:
    """Copy the tokenizer and generation files that sit beside a model's weights."""
    copied = []
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "generation_config.json",
    ):
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(target) / name)
            copied.append(name)
    return copied
