"""Checkpoints the pruned models cannot serve are refused when the model is built, not at a request."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import LlavaConfig

from vllm_promprune.engine.models.clip_saliency import check_clip_llava_config
from vllm_promprune.tools.server_process import ServerProcess

from .conftest import free_port


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


def test_server_refuses_to_start_on_an_unsupported_checkpoint(tiny_llava: Path, tmp_path: Path) -> None:
    model = tmp_path / "llava-full-strategy"
    shutil.copytree(tiny_llava, model)
    config = json.loads((model / "config.json").read_text())
    config["vision_feature_select_strategy"] = "full"
    (model / "config.json").write_text(json.dumps(config))
    port = free_port()
    server = ServerProcess(str(model), ["--enforce-eager", "--dtype", "float32", "--keep", "8"], port, tmp_path / "log")
    with pytest.raises(RuntimeError, match="server exited"):
        server.start(timeout=300)
    log = (tmp_path / "log").read_text(errors="replace")
    assert "vllm-promprune cannot prune this LLaVA checkpoint: vision_feature_select_strategy 'full'" in log
