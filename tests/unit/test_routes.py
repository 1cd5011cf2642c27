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


class _Forwarded:
    """An app behind the middleware that records the headers and body it received."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict, bytes]] = []

    async def __call__(self, scope, receive, send) -> None:
        self.requests.append((dict(scope["headers"]), (await receive())["body"]))


@pytest.fixture
def json_loads_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The bodies `json.loads` is called on while the test runs."""
    calls: list[bytes] = []
    loads = json.loads

    def recording_loads(text: str | bytes, *args: object, **kwargs: object) -> object:
        calls.append(text)
        return loads(text, *args, **kwargs)

    monkeypatch.setattr(json, "loads", recording_loads)
    return calls


def _image_body(**extra: object) -> bytes:
    import base64

    url = "data:image/png;base64," + base64.b64encode(bytes(range(256)) * 4096).decode()  # 1 MiB "image"
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is shown?"}]
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": content}], **extra}).encode()


def test_middleware_forwards_bodies_without_a_pruning_key_unparsed_and_byte_identical(
    json_loads_calls: list[bytes],
) -> None:
    app = _Forwarded()
    middleware = PruningSettingsMiddleware(app)
    bodies = [
        _image_body(),
        _image_body(vllm_xargs={"other": 1}, mm_processor_kwargs={"num_crops": 2}),
        b'{ "model" :"m",\n "messages": [], "stop": ["a\\/b"] }',  # a backslash, but no \u escape
        b"{not json",
    ]
    for body in bodies:
        _call(middleware, body)
    assert json_loads_calls == []
    assert [forwarded for _, forwarded in app.requests] == bodies
    assert all(headers[b"content-length"] == str(len(body)).encode() for (headers, _), body in zip(app.requests, bodies))


def test_middleware_folds_escaped_keys_like_plain_ones(json_loads_calls: list[bytes]) -> None:
    app = _Forwarded()
    middleware = PruningSettingsMiddleware(app)
    plain = _image_body(vllm_xargs={"promprune_keep": 16})
    escaped = [
        plain,
        plain.replace(b"promprune_keep", b"promprune\\u005fkeep"),
        plain.replace(b"promprune_keep", b"\\u0070r\\u006Fmprune_keep"),  # no literal "promprune" left
    ]
    for body in escaped:
        _call(middleware, body)
    assert json_loads_calls == escaped
    folded = [json.loads(forwarded) for _, forwarded in app.requests]
    assert folded[0]["mm_processor_kwargs"] == {"promprune": {"keep": 16}} and "vllm_xargs" not in folded[0]
    assert folded == [folded[0]] * 3
    clash = b'{"mm_processor_kwargs": {"\\u0070romprune": {"keep": 8}}, "vllm_xargs": {"promprune_keep": 9}}'
    sent = _call(middleware, clash)
    assert sent[0]["status"] == 400 and len(app.requests) == 3


def test_middleware_parses_bodies_with_escapes_or_utf16_and_forwards_them_unchanged(
    json_loads_calls: list[bytes],
) -> None:
    app = _Forwarded()
    middleware = PruningSettingsMiddleware(app)
    escaped_text = json.dumps({"model": "m", "messages": [{"role": "user", "content": "café"}]}).encode()
    utf16 = json.dumps({"vllm_xargs": {"promprune_keep": 4}}).encode("utf-16")  # no UTF-8 "promprune" bytes
    _call(middleware, escaped_text)
    _call(middleware, utf16)
    assert json_loads_calls == [escaped_text, utf16]
    assert app.requests[0][1] == escaped_text  # no pruning key: as it came
    assert json.loads(app.requests[1][1]) == {"mm_processor_kwargs": {"promprune": {"keep": 4}}}
