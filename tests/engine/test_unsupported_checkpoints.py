"""A checkpoint the pruned models cannot serve is refused, naming why: by `vllm-promprune serve`
before vLLM starts, and by the pruned model when vLLM builds it (the config checks themselves:
tests/unit/test_unsupported_checkpoints.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from vllm_promprune.tools import cli

from .conftest import offline_engine

REFUSAL = "vllm-promprune cannot prune this LLaVA checkpoint: vision_feature_select_strategy 'full'"


@pytest.fixture(scope="module")
def full_strategy_llava(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("unsupported") / "llava-full-strategy"
    shutil.copytree(tiny_llava, model)
    config = json.loads((model / "config.json").read_text())
    config["vision_feature_select_strategy"] = "full"
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_serve_refuses_before_vllm_starts(full_strategy_llava: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def vllm_started(argv: list[str]) -> None:
        raise AssertionError(f"vLLM serve started on an unsupported checkpoint: {argv}")

    monkeypatch.setattr(cli, "run_vllm_serve", vllm_started)
    environment = dict(os.environ)  # serve applies the CPU defaults to this process's environment
    try:
        with pytest.raises(SystemExit, match=REFUSAL):
            cli.main(["serve", str(full_strategy_llava), "--enforce-eager", "--keep", "8"])
    finally:
        os.environ.clear()
        os.environ.update(environment)


def test_pruned_model_refuses_when_vllm_builds_it(full_strategy_llava: Path) -> None:
    # What `vllm serve --hf-overrides ...` (without the CLI's check) and the offline engine meet.
    with pytest.raises(Exception, match=REFUSAL):
        with offline_engine(full_strategy_llava, {"enforce_eager": True, "max_model_len": 2048}, pruned=True):
            pass
