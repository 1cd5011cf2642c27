"""`vllm-promprune serve` end to end: a live OpenAI server on the tiny checkpoint."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from vllm_promprune.demo import chat_request, image_data_url
from vllm_promprune.server_process import ServerProcess
from vllm_promprune.synthetic import scene_image

MODEL_NAME = "tiny"
NUM_TOKENS = 576
SERVER_DEFAULT_KEEP = 32


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = [
        "--keep", str(SERVER_DEFAULT_KEEP),
        "--trust-request-mm-kwargs", "--enforce-eager", "--dtype", "float32",
        "--max-model-len", "2048", "--served-model-name", MODEL_NAME,
    ]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(str(tiny_llava), args, _free_port(), log) as process:
        yield process


def _chat(server: ServerProcess, settings: dict | None, seed: int = 0) -> requests.Response:
    body = chat_request(MODEL_NAME, image_data_url(scene_image(seed)), settings, max_tokens=4)
    return requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)


def _prompt_tokens(server: ServerProcess, settings: dict | None, seed: int = 0) -> int:
    response = _chat(server, settings, seed)
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


@pytest.fixture(scope="module")
def text_tokens(server: ServerProcess) -> int:
    """Prompt tokens of the chat request besides the image."""
    text = _prompt_tokens(server, {"keep": None}) - NUM_TOKENS  # keep=None opts out of the default
    assert text > 0
    return text


def test_usage_prompt_tokens_follow_per_request_and_default_budgets(server: ServerProcess, text_tokens: int) -> None:
    text = text_tokens
    assert _prompt_tokens(server, None) == text + SERVER_DEFAULT_KEEP
    assert _prompt_tokens(server, {"keep": 64}) == text + 64
    assert _prompt_tokens(server, {"mu": 0.3}) == text + SERVER_DEFAULT_KEEP  # merged key by key
    assert _prompt_tokens(server, {"keep": 10_000}) == text + NUM_TOKENS


def test_bad_settings_get_400_naming_the_field_and_server_keeps_serving(server: ServerProcess, text_tokens: int) -> None:
    for settings, field in [({"keep": 0}, "promprune.keep"), ({"method": "magic"}, "promprune.method"), ({"wat": 1}, "wat")]:
        response = _chat(server, settings)
        assert response.status_code == 400, response.text
        assert field in response.json()["error"]["message"]
    assert _prompt_tokens(server, {"keep": 16}, seed=1) == text_tokens + 16
