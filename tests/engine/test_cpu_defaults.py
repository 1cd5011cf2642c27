"""`vllm-promprune serve` starts in a bare environment: the CLI applies vLLM's CPU defaults itself.

Without them vLLM's CPU backend refuses to start on these machines ("Available memory
on node 0 ... is less than desired CPU memory utilization"), as it did for a newcomer
who had not sourced scripts/env.sh (issue #24).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests

from vllm_promprune.testing.synthetic import scene_image
from vllm_promprune.tools.cpu_defaults import vllm_runs_on_cpu
from vllm_promprune.tools.demo import chat_request, image_data_url
from vllm_promprune.tools.server_process import ServerProcess

from .conftest import free_port

MODEL_NAME = "llava-bare-env"
KEEP = 16
NUM_TOKENS = 576  # image tokens of the tiny LLaVA-1.5 checkpoint


@pytest.mark.skipif(not vllm_runs_on_cpu(), reason="the defaults apply to vLLM's CPU backend only")
def test_serve_starts_and_answers_with_only_path_and_home(tiny_llava: Path, tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"]}
    if "PYTHONPATH" in os.environ:  # the checkout under test (e.g. a worktree beside the venv's editable install)
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    args = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "2048", "--served-model-name", MODEL_NAME]
    log = tmp_path / "server.log"
    with ServerProcess(str(tiny_llava), args, free_port(), log, env, inherit_env=False) as server:
        body = chat_request(MODEL_NAME, image_data_url(scene_image(0)), None, max_tokens=2)
        body["vllm_xargs"] = {"promprune_keep": KEEP}  # through the middleware
        response = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] < NUM_TOKENS  # pruned to KEEP image tokens
    assert "VLLM_CPU_KVCACHE_SPACE=1" in log.read_text()  # the CLI says which defaults it applied
