"""Bounded load against a live `vllm-promprune serve`: no request can take the engine down.

One server on the tiny LLaVA checkpoint, with a test-only method that always
raises (tests/engine/failing_method.py) loaded through VLLM_PROMPRUNE_METHODS. About
200 requests at concurrency 16 mix methods, budgets, both settings routes,
two-image requests, requests that hit the failing method, and ~5 % bad
requests. Good requests must answer 200 with their solo prompt length and (on
AVX-512 CPUs, see CPU_HAS_AVX512) exactly their solo answer; bad
ones 400 naming the field; the failing method's requests fall back to evenly
strided tokens (200, K tokens) and are counted in
`vllm:promprune_selection_failures_total`. Loops are bounded in count and time
and only target 127.0.0.1.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from vllm_promprune.testing.synthetic import scene_image
from vllm_promprune.tools.demo import image_data_url
from vllm_promprune.tools.server_process import ServerProcess

from .conftest import CPU_HAS_AVX512, free_port

# Registered by tests/engine/failing_method.py inside the server's processes only: importing
# that module here would add the method to this test process's registry too.
FAILING_METHOD = "always_fails"

PRESET = Path(__file__).resolve().parents[2] / "configs" / "cpu-demo.yaml"
MODEL_NAME = "llava-offline"
NUM_TOKENS = 576
TOTAL_REQUESTS = 200
CONCURRENCY = 16
IMAGES = [image_data_url(scene_image(seed)) for seed in range(3)]


@pytest.fixture(scope="module")
def server(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tests_dir = str(Path(__file__).resolve().parent)
    env = {
        "VLLM_PROMPRUNE_METHODS": "failing_method",
        "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])),
    }
    # No prefix or processor cache: each request under load recomputes its prefill and
    # (unless vLLM's small encoder cache still holds it) its image, so it is compared,
    # not replayed, against its solo answer.
    args = ["--config", str(PRESET), "--limit-mm-per-prompt", '{"image": 2}', "--max-num-seqs", "16",
            "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0"]
    log = tmp_path_factory.mktemp("server") / "load.log"
    with ServerProcess(str(tiny_llava), args, free_port(), log, env=env) as process:
        yield process


def _body(images: list[int], mm: dict | None = None, xargs: dict | None = None) -> dict:
    content = [{"type": "image_url", "image_url": {"url": IMAGES[i]}} for i in images]
    body: dict = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": [*content, {"type": "text", "text": "What is shown?"}]}],
        "max_tokens": 4,
        "temperature": 0.0,
    }
    if mm is not None:
        body["mm_processor_kwargs"] = {"promprune": mm}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return body


def _good_requests() -> list[dict]:
    """Distinct valid requests: every method, two budgets, both routes, one and two images."""
    methods = ["promprune", "prunesid", "divprune", "vispruner", "visionzip", "fps", "facility_location",
               "uniform", "random", "saliency", "coverage", FAILING_METHOD]
    good = []
    for index, method in enumerate(methods):
        keep = (8, 48)[index % 2]
        good.append(_body([index % 3], mm={"keep": keep, "method": method}))
        good.append(_body([(index + 1) % 3], xargs={"promprune_keep": keep + 1, "promprune_method": method}))
    good += [
        _body([0, 1], mm={"keep": [8, 24], "method": "divprune"}),
        _body([1, 2], xargs={"promprune_keep": [16, 4], "promprune_mu": 0.3}),
        _body([2]),  # the preset's server default (keep 64)
        _body([0], mm={"keep": None}),  # opt out: unpruned
        _body([1], mm={"ratio": 0.05, "order": "selection"}),
    ]
    return good


BAD_REQUESTS = [
    (_body([0], mm={"keep": 0}), "promprune.keep"),
    (_body([0], mm={"keep": 8, "method": "nope"}), "promprune.method"),
    (_body([1], mm={"keep": 8, "tau": -1}), "promprune.tau"),
    (_body([1], mm={"keep": 5, "method": "random", "seed": 2**80}), "promprune.seed"),
    (_body([0, 1], xargs={"promprune_keep": [8]}), "promprune.keep"),
    (_body([2], mm={"keep": 8, "method": "visionzip", "order": "selection"}), "promprune.order"),
]


def _post(server: ServerProcess, body: dict) -> requests.Response:
    return requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)


def _answer(response: requests.Response) -> tuple[int, str]:
    assert response.status_code == 200, response.text
    payload = response.json()
    return payload["usage"]["prompt_tokens"], payload["choices"][0]["message"]["content"]


def _failures(server: ServerProcess) -> float:
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    pattern = rf'^vllm:promprune_selection_failures_total\{{method="{FAILING_METHOD}"\}} (\S+)$'
    found = re.findall(pattern, text, flags=re.MULTILINE)
    return float(found[0]) if found else 0.0


def test_mixed_load_with_bad_and_failing_requests(server: ServerProcess) -> None:
    good = _good_requests()
    solo = [_answer(_post(server, body)) for body in good]
    unpruned_tokens = solo[len(good) - 2][0]  # the keep=None request
    text_tokens = unpruned_tokens - NUM_TOKENS
    failing = [i for i, body in enumerate(good) if FAILING_METHOD in str(body.get("mm_processor_kwargs", body.get("vllm_xargs")))]
    for i in failing:  # the guard's fallback keeps the placeholder contract: K rows
        keep = good[i].get("mm_processor_kwargs", {}).get("promprune", {}).get("keep") or good[i]["vllm_xargs"]["promprune_keep"]
        assert solo[i][0] == text_tokens + keep
    failures_before = _failures(server)
    assert failures_before >= len(failing)
    # VisPruner ranks as its reference does, with torch's unstable argsort: the order of exactly
    # tied duplication scores then depends on the whole row, and the tower's floats for an
    # image micro-batched with other requests' images can differ from its solo run in the last
    # bit, so its answers under load are not compared with solo ones (docs/methods.md, VisPruner).
    reproducible = [i for i, body in enumerate(good) if "vispruner" not in str(body)]

    rng = random.Random(0)
    schedule: list[tuple[dict, int | None, str | None]] = []
    for _ in range(TOTAL_REQUESTS):
        if rng.random() < 0.05:
            body, field = rng.choice(BAD_REQUESTS)
            schedule.append((body, None, field))
        else:
            index = rng.randrange(len(good))
            schedule.append((good[index], index, None))
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        responses = list(pool.map(lambda item: _post(server, item[0]), schedule))

    bad_seen = 0
    for (_, index, field), response in zip(schedule, responses):
        if index is None:
            bad_seen += 1
            assert response.status_code == 400, response.text
            assert field in response.json()["error"]["message"]
        else:
            prompt_tokens, answer = _answer(response)
            assert prompt_tokens == solo[index][0], f"request {index}: prompt length differs from its solo run"
            if CPU_HAS_AVX512 and index in reproducible:  # batched = solo floats (see CPU_HAS_AVX512)
                assert answer == solo[index][1], f"request {index} differs from its solo answer"
    assert bad_seen > 0
    assert sum(1 for _, index, _ in schedule if index in failing) > 0
    assert _failures(server) > failures_before  # the failing method ran again under load
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
    assert "selection raised" in server.log_path.read_text(errors="replace")
