"""Shared fixtures: offline checkpoints are built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vllm_promprune.checkpoints import build_llava

    return build_llava(tmp_path_factory.mktemp("models") / "llava-tiny", size="tiny", seed=0)
