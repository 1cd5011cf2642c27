"""Checkpoints the pruned models cannot serve are refused when the model is built, not at a request
(`vllm-promprune serve` and vLLM refusing one: tests/engine/test_unsupported_checkpoints.py)."""

from __future__ import annotations

import pytest
from transformers import LlavaConfig

from vllm_promprune.engine.models.clip_saliency import check_clip_llava_config


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"vision_config": {"model_type": "siglip_vision_model"}}, "vision tower 'siglip_vision_model'"),
        ({"vision_config": {"model_type": "pixtral"}}, "vision tower 'pixtral'"),
        ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy 'full'"),
        ({"vision_feature_layer": [-2, -5]}, "vision_feature_layer [-2, -5]"),
    ],
)
def test_unsupported_llava_configs_are_named(overrides: dict, named: str) -> None:
    with pytest.raises(ValueError, match="cannot prune this LLaVA checkpoint") as error:
        check_clip_llava_config(LlavaConfig(**overrides), "LLaVA")
    assert named in str(error.value)


def test_supported_llava_config_passes() -> None:
    check_clip_llava_config(LlavaConfig(), "LLaVA")  # CLIP, 'default', layer -2
