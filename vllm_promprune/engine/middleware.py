"""ASGI middleware for vLLM's OpenAI server: the `vllm_xargs` route for pruning settings.

Install with `--middleware vllm_promprune.engine.middleware.PruningSettingsMiddleware`
(`vllm-promprune serve` adds it). For chat and completion requests it moves
`vllm_xargs.promprune_*` keys into `mm_processor_kwargs.promprune`, where vLLM's
multimodal processor and hash see them, and answers 400 if the two routes
disagree. The settings themselves are validated by the pruned processor, which
also knows the server default they are merged over. It also hands the server's
engine client to `planning`, whose planning pass serves adaptive budgets.

A body that cannot hold a pruning key is passed on as it came, without being
parsed (see `may_hold_settings`): chat bodies carry multi-MB base64 images, and
parsing runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..settings import SETTINGS_KEY
from . import planning
from .routes import XARGS_PREFIX, combine_routes, settings_from_xargs, without_settings_keys

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PATHS = ("/v1/chat/completions", "/v1/completions")
_KEY = SETTINGS_KEY.encode()  # XARGS_PREFIX is SETTINGS_KEY + "_"


def rewrite_request(payload: dict[str, Any]) -> dict[str, Any]:
    """The request with settings from `vllm_xargs` folded into `mm_processor_kwargs`."""
    xargs = payload.get("vllm_xargs")
    mm_kwargs = payload.get("mm_processor_kwargs")
    from_mm = mm_kwargs.get(SETTINGS_KEY) if isinstance(mm_kwargs, dict) else None
    from_xargs = settings_from_xargs(xargs) if isinstance(xargs, dict) else None
    combined = combine_routes(from_mm, from_xargs, f"vllm_xargs.{XARGS_PREFIX}")
    if combined is None:
        return payload
    rewritten = dict(payload)
    rewritten["mm_processor_kwargs"] = {**(mm_kwargs or {}), SETTINGS_KEY: combined}
    if from_xargs is not None:
        remaining = without_settings_keys(xargs)
        if remaining:
            rewritten["vllm_xargs"] = remaining
        else:
            del rewritten["vllm_xargs"]
    return rewritten


class PruningSettingsMiddleware:
    """Pure ASGI middleware (streaming responses pass through untouched)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope.get("app")
        engine_client = getattr(getattr(app, "state", None), "engine_client", None)
        if engine_client is not None:  # adaptive budgets plan through it (`planning`)
            planning.attach_async_engine(engine_client, asyncio.get_running_loop())
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in PATHS:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        payload = _json_object(body) if may_hold_settings(body) else None
        if payload is not None:
            try:
                rewritten = rewrite_request(payload)
            except ValueError as error:
                await _send_bad_request(send, str(error))
                return
            if rewritten is not payload:
                body = json.dumps(rewritten).encode()
                scope = dict(scope)
                scope["headers"] = [
                    (name, str(len(body)).encode() if name.lower() == b"content-length" else value)
                    for name, value in scope["headers"]
                ]
        await self.app(scope, _replay(body, receive), send)


def may_hold_settings(body: bytes) -> bool:
    """False only if no JSON spelling of a pruning key can occur in `body`.

    The keys of both routes contain "promprune" (`mm_processor_kwargs.promprune`,
    `vllm_xargs.promprune_*`). JSON also lets a client write any character of a key
    as a `\\uXXXX` escape (`"promprune\\u005fkeep"` is the key `promprune_keep`); no
    single byte pattern covers every such spelling and a regex for them scans slower
    than parsing, so a body with any `\\u` escape is parsed, as all bodies were.
    Base64 image data holds no backslash, so the usual image request costs two scans.
    The byte search assumes UTF-8; vLLM (like `json.loads`) also accepts UTF-16 and
    UTF-32 JSON, which is recognised the way `json.loads` does and always parsed.
    """
    if json.detect_encoding(body) not in ("utf-8", "utf-8-sig"):
        return True
    return _KEY in body or (b"\\" in body and b"\\u" in body)


def _json_object(body: bytes) -> dict[str, Any] | None:
    """The body's JSON object; None if it is not one (vLLM answers malformed JSON itself)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the client's disconnect

    return replay


async def _send_bad_request(send: Send, message: str) -> None:
    body = json.dumps(
        {"error": {"message": message, "type": "BadRequestError", "param": SETTINGS_KEY, "code": 400}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
