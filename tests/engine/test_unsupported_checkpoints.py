"""A server on a checkpoint the pruned models cannot serve refuses to start, naming why
(the config checks themselves: tests/unit/test_unsupported_checkpoints.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vllm_promprune.tools.server_process import ServerProcess

from .conftest import free_port


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
