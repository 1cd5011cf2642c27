"""Let untrusted clients send `mm_processor_kwargs.promprune`, and nothing else.

vLLM 0.32 refuses every per-request `mm_processor_kwargs` unless the server runs
with `--trust-request-mm-kwargs`, which opens all HF-processor kwargs to every
client. Pruning settings are validated by the pruned processor and can only
shrink the work, so this patch exempts exactly the `promprune` key: with the
flag off, any other key is still refused by vLLM's own check, unchanged.

Patched: `vllm.renderers.online_renderer.validate_request_mm_kwargs` (the name
the chat and completion renderers call). Guarded by the vLLM version and the
function's signature; a mismatch raises at plugin load instead of silently
leaving clients unable to prune.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ...settings import SETTINGS_KEY
from .. import SUPPORTED_VLLM

_EXPECTED_PARAMETERS = ("mm_processor_kwargs", "media_io_kwargs", "trust_request_mm_kwargs")
_MARK = "_vllm_promprune_patched"


def exempt_pruning_settings(original: Callable[..., None]) -> Callable[..., None]:
    """Wrap vLLM's check so that the `promprune` key alone never needs trust."""

    def validate_request_mm_kwargs(
        *,
        mm_processor_kwargs: dict[str, Any] | None,
        media_io_kwargs: dict[str, dict[str, Any]] | None,
        trust_request_mm_kwargs: bool,
    ) -> None:
        if mm_processor_kwargs and not trust_request_mm_kwargs:
            mm_processor_kwargs = {k: v for k, v in mm_processor_kwargs.items() if k != SETTINGS_KEY}
        original(
            mm_processor_kwargs=mm_processor_kwargs,
            media_io_kwargs=media_io_kwargs,
            trust_request_mm_kwargs=trust_request_mm_kwargs,
        )

    setattr(validate_request_mm_kwargs, _MARK, True)
    return validate_request_mm_kwargs


def apply() -> None:
    """Install the patch in this process (idempotent)."""
    import vllm
    from vllm.renderers import online_renderer

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        raise RuntimeError(f"trust_pruning_kwargs patch is written for vLLM {SUPPORTED_VLLM}x, found {vllm.__version__}")
    current = online_renderer.validate_request_mm_kwargs
    if getattr(current, _MARK, False):
        return
    parameters = tuple(inspect.signature(current).parameters)
    if parameters != _EXPECTED_PARAMETERS:
        raise RuntimeError(
            f"vLLM's validate_request_mm_kwargs changed (parameters {parameters}); "
            "the vllm-promprune patch needs updating"
        )
    online_renderer.validate_request_mm_kwargs = exempt_pruning_settings(current)
