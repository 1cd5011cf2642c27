"""Request routes for settings: xargs folding, conflicts, the ASGI middleware, the trust patch."""

from __future__ import annotations

import asyncio
import json

import pytest

from vllm_promprune.engine.middleware import PruningSettingsMiddleware, rewrite_request
from vllm_promprune.engine.routes import combine_routes, settings_from_xargs


def test_xargs_keys_become_settings() -> None:
    assert settings_from_xargs({"promprune_keep": 64, "promprune_method": "fps", "other": 1}) == {"keep": 64, "method": "fps"}
    assert settings_from_xargs({"other": 1}) is None
    assert settings_from_xargs(None) is None


def test_routes_merge_sorted_and_conflicts_name_both_fields() -> None:
    assert list(combine_routes({"method": "fps", "keep": 8}, None, "x.")) == ["keep", "method"]
    assert combine_routes({"keep": 8}, {"keep": 8, "mu": 0.3}, "x.") == {"keep": 8, "mu": 0.3}
    assert combine_routes(None, None, "x.") is None
    with pytest.raises(ValueError, match=r"mm_processor_kwargs\.promprune\.keep=8 but vllm_xargs\.promprune_keep=16"):
        combine_routes({"keep": 8}, {"keep": 16}, "vllm_xargs.promprune_")
    with pytest.raises(ValueError, match="must be an object"):
        combine_routes(64, None, "x.")


def test_rewrite_moves_xargs_into_mm_processor_kwargs() -> None:
    request = {"model": "m", "vllm_xargs": {"promprune_keep": 32, "promprune_mu": 0.3, "other": "x"}}
    rewritten = rewrite_request(request)
    assert rewritten["mm_processor_kwargs"] == {"promprune": {"keep": 32, "mu": 0.3}}
    assert rewritten["vllm_xargs"] == {"other": "x"}
    assert rewrite_request({"model": "m"}) == {"model": "m"}
    only = rewrite_request({"vllm_xargs": {"promprune_keep": 4}})
    assert "vllm_xargs" not in only
    assert rewrite_request({"mm_processor_kwargs": {"promprune": {"method": "fps", "keep": 2}}}) == {
        "mm_processor_kwargs": {"promprune": {"keep": 2, "method": "fps"}}  # canonical key order
    }


def _call(middleware: PruningSettingsMiddleware, body: bytes, path: str = "/v1/chat/completions") -> list:
    """Send one POST through `middleware`; returns the messages it sent itself."""
    sent: list = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", str(len(body)).encode())]}
    asyncio.run(middleware(scope, receive, send))
    return sent


def test_middleware_rewrites_body_and_content_length() -> None:
    captured: list = []

    async def app(scope, receive, send) -> None:
        captured.append((dict(scope["headers"]), (await receive())["body"]))

    middleware = PruningSettingsMiddleware(app)
    body = json.dumps({"vllm_xargs": {"promprune_keep": 16}}).encode()
    _call(middleware, body)
    headers, forwarded = captured[0]
    assert json.loads(forwarded) == {"mm_processor_kwargs": {"promprune": {"keep": 16}}}
    assert headers[b"content-length"] == str(len(forwarded)).encode()


def test_middleware_answers_conflicts_with_400_and_passes_other_paths() -> None:
    captured: list = []

    async def app(scope, receive, send) -> None:
        captured.append((await receive())["body"])

    middleware = PruningSettingsMiddleware(app)
    clash = json.dumps({"mm_processor_kwargs": {"promprune": {"keep": 8}}, "vllm_xargs": {"promprune_keep": 9}}).encode()
    sent = _call(middleware, clash)
    assert sent[0]["status"] == 400 and not captured
    assert "promprune_keep=9" in json.loads(sent[1]["body"])["error"]["message"]
    _call(middleware, clash, path="/v1/models")
    _call(middleware, b"{not json")
    assert captured == [clash, b"{not json"]  # untouched


def test_trust_patch_exempts_only_the_pruning_key() -> None:
    from vllm_promprune.engine.patches.trust_pruning_kwargs import exempt_pruning_settings

    calls: list = []

    def vllm_check(*, mm_processor_kwargs, media_io_kwargs, trust_request_mm_kwargs) -> None:
        calls.append(mm_processor_kwargs)

    check = exempt_pruning_settings(vllm_check)
    check(mm_processor_kwargs={"promprune": {"keep": 1}, "size": 3}, media_io_kwargs=None, trust_request_mm_kwargs=False)
    check(mm_processor_kwargs={"promprune": {"keep": 1}}, media_io_kwargs=None, trust_request_mm_kwargs=True)
    assert calls == [{"size": 3}, {"promprune": {"keep": 1}}]
