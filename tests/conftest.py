"""Shared fixtures: offline checkpoints are built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vllm_promprune.checkpoints import build_llava

    return build_llava(tmp_path_factory.mktemp("models") / "llava-tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vllm_promprune.checkpoints import build_llava_next

    return build_llava_next(tmp_path_factory.mktemp("models") / "llava-next-tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vllm_promprune.checkpoints import build_qwen2_5_vl

    return build_qwen2_5_vl(tmp_path_factory.mktemp("models") / "qwen2.5-vl-tiny", size="tiny", seed=0)
