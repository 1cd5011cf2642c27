"""`vllm-promprune serve --data-parallel-size 2`: per-request budgets on two engine replicas.

Each data-parallel rank is a full engine with its own processor and model, so the
plugin is loaded in each; on these CPUs each rank is bound to one core
(VLLM_CPU_OMP_THREADS_BIND="0|1").
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from vllm_promprune.testing.synthetic import scene_image
from vllm_promprune.tools.demo import chat_request, image_data_url
from vllm_promprune.tools.server_process import ServerProcess

from .conftest import free_port

NUM_TOKENS = 576


@pytest.fixture(scope="module")
def server(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    port = free_port()
    args = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "2048", "--served-model-name", "tiny",
            "--keep", "16", "--data-parallel-size", "2"]
    log = tmp_path_factory.mktemp("server") / "dp.log"
    with ServerProcess(str(tiny_llava), args, port, log, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}) as process:
        yield process


def _chat(server: ServerProcess, index: int) -> tuple[int | None, int, str]:
    """Request `index` of a mix: server default, either route, opt-out."""
    keep = [None, 8, 40, None][index % 4]
    body = chat_request("tiny", image_data_url(scene_image(index % 3)), None, max_tokens=4)
    if index % 4 == 1:
        body["vllm_xargs"] = {"promprune_keep": keep}
    elif index % 4 == 2:
        body["mm_processor_kwargs"] = {"promprune": {"keep": keep, "method": "divprune"}}
    elif index % 4 == 3:
        body["mm_processor_kwargs"] = {"promprune": {"keep": None}}
        keep = NUM_TOKENS
    response = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    payload = response.json()
    return keep, payload["usage"]["prompt_tokens"], payload["choices"][0]["message"]["content"]


def test_budgets_on_two_data_parallel_engines(server: ServerProcess) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda index: _chat(server, index), range(24)))
    text = results[3][1] - NUM_TOKENS
    for index, (keep, prompt_tokens, _) in enumerate(results):
        assert prompt_tokens == text + (16 if keep is None else keep), index  # default --keep 16
    for index, (_, _, answer) in enumerate(results):  # the same request answers the same on either rank
        assert answer == results[index % 12][2]
    metrics = requests.get(f"{server.url}/metrics", timeout=30).text
    served = re.findall(r'^vllm:request_success_total\{[^}]*engine="(\d+)"[^}]*\} (\S+)$', metrics, re.MULTILINE)
    engines = {engine for engine, count in served if float(count) > 0}
    assert engines == {"0", "1"}, served  # both replicas served requests
