"""`vllm-promprune serve` for LLaVA-NeXT and the Qwen-VL families: per-request budgets through the OpenAI API."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from vllm_promprune.families.anyres import anyres_layout
from vllm_promprune.testing.checkpoints import ANYRES_PINPOINTS
from vllm_promprune.testing.synthetic import scene_image
from vllm_promprune.tools.demo import image_data_url
from vllm_promprune.tools.server_process import ServerProcess

from .conftest import free_port

# (width, height) of the two images and their unpruned placeholder counts.
SIZES = [(672, 336), (336, 672)]
STOCK_TOKENS = {
    "llava-next": [anyres_layout(h, w, ANYRES_PINPOINTS, 336, 14).num_stock_tokens for w, h in SIZES],
    "qwen2.5-vl": [(w // 28) * (h // 28) for w, h in SIZES],  # merged 28 x 28 px cells
    "qwen2-vl": [(w // 28) * (h // 28) for w, h in SIZES],
    # Qwen3-VL resizes to multiples of its 32 x 32 px merged cell: 672 x 336 -> 672 x 320.
    "qwen3-vl": [21 * 10, 10 * 21],
}
# Qwen3-VL-MoE is served through the same processor, model template and routes as
# Qwen3-VL; its engine-level tests are in test_engine_qwen.py.
CHECKPOINTS = {"llava-next": "tiny_llava_next", "qwen2.5-vl": "tiny_qwen2_5_vl", "qwen2-vl": "tiny_qwen2_vl",
               "qwen3-vl": "tiny_qwen3_vl"}


FAMILY_ORDER = sorted(STOCK_TOKENS)
SERVE_ARGS = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "4096", "--served-model-name", "tiny",
              "--limit-mm-per-prompt", '{"image": 2, "video": 0}', "--keep", "24"]


@pytest.fixture(scope="module")
def family_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """The module's servers by family, launched by `served`; any left are stopped at the end."""
    servers: dict[str, ServerProcess] = {}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module", params=FAMILY_ORDER)
def served(
    request: pytest.FixtureRequest, family_servers: dict[str, ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ServerProcess]]:
    # A server spends ~40 s starting, mostly importing torch and vLLM in its three processes
    # (one core each at a time): servers start in pairs of families, two at once on the two
    # cores, and at most two are alive (memory).
    family = request.param
    if family not in family_servers:
        start = FAMILY_ORDER.index(family)
        for name in FAMILY_ORDER[start : start + 2]:
            model = request.getfixturevalue(CHECKPOINTS[name])
            log = tmp_path_factory.mktemp("server") / f"{name}.log"
            family_servers[name] = ServerProcess(str(model), SERVE_ARGS, free_port(), log).launch()
    server = family_servers[family].wait_ready()
    yield family, server
    server.stop()


def _chat(server: ServerProcess, images: list[int], **extra: object) -> requests.Response:
    """A chat request with the scenes of `images` (indices into SIZES; repeats are copies)."""
    content = [{"type": "image_url", "image_url": {"url": image_data_url(scene_image(i, *SIZES[i]))}}
               for i in images]
    body = {"model": "tiny", "messages": [{"role": "user", "content": [*content, {"type": "text", "text": "Describe."}]}],
            "max_tokens": 4, "temperature": 0.0, **extra}
    return requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=600)


def _prompt_tokens(server: ServerProcess, images: list[int], **extra: object) -> int:
    response = _chat(server, images, **extra)
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


def test_per_request_budgets(served: tuple[str, ServerProcess]) -> None:
    family, server = served
    stock = STOCK_TOKENS[family]
    unpruned = _prompt_tokens(server, [0], vllm_xargs={"promprune_keep": 100_000})
    assert _prompt_tokens(server, [0]) == unpruned - stock[0] + 24  # server default --keep 24
    assert _prompt_tokens(server, [0], vllm_xargs={"promprune_keep": 60}) == unpruned - stock[0] + 60
    assert _prompt_tokens(server, [0], mm_processor_kwargs={"promprune": {"keep": 7, "method": "fps"}}) == (
        unpruned - stock[0] + 7
    )


def test_one_budget_per_image(served: tuple[str, ServerProcess]) -> None:
    family, server = served
    stock = STOCK_TOKENS[family]
    unpruned = _prompt_tokens(server, [0, 1], vllm_xargs={"promprune_keep": 100_000})
    pruned = _prompt_tokens(server, [0, 1], vllm_xargs={"promprune_keep": [10, 30]})
    assert pruned == unpruned - sum(stock) + 40
    # Two copies of one image are two items, each with its own budget (vLLM's processing
    # cache must not serve the second copy, and its placeholder count, from the first).
    text = unpruned - sum(stock)
    assert _prompt_tokens(server, [0, 0], vllm_xargs={"promprune_keep": [3, 100]}) == text + 103
    assert _prompt_tokens(server, [0, 0], vllm_xargs={"promprune_keep": [100, 3]}) == text + 103
    wrong = _chat(server, [0, 1], vllm_xargs={"promprune_keep": [10]})
    assert wrong.status_code == 400
    assert "promprune.keep: a list needs one value per image" in wrong.json()["error"]["message"]
    assert _prompt_tokens(server, [0]) > 0  # still serving


def test_cdpruner_selects_by_a_multi_turn_conversation_through_both_routes(served: tuple[str, ServerProcess]) -> None:
    family, server = served
    image = {"type": "image_url", "image_url": {"url": image_data_url(scene_image(0, *SIZES[0]))}}
    messages = [
        {"role": "user", "content": [image, {"type": "text", "text": "What colour is the car?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "text", "text": "And what does the sign say?"}]},
    ]

    def post(**extra: object) -> requests.Response:
        body = {"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0.0, **extra}
        return requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=600)

    unpruned = post(vllm_xargs={"promprune_keep": 100_000})
    via_xargs = post(vllm_xargs={"promprune_keep": 20, "promprune_method": "cdpruner"})
    via_mm = post(mm_processor_kwargs={"promprune": {"keep": 20, "method": "cdpruner"}})
    for response in (unpruned, via_xargs, via_mm):
        assert response.status_code == 200, response.text
    tokens = unpruned.json()["usage"]["prompt_tokens"] - STOCK_TOKENS[family][0] + 20
    assert via_xargs.json()["usage"]["prompt_tokens"] == via_mm.json()["usage"]["prompt_tokens"] == tokens
    assert via_xargs.json()["choices"][0]["message"] == via_mm.json()["choices"][0]["message"]
    bad = post(vllm_xargs={"promprune_keep": 20, "promprune_method": "cdpruner", "promprune_theta": 1.5})
    assert bad.status_code == 400 and "promprune.theta" in bad.json()["error"]["message"]
