"""The plugin installs its one vLLM patch: the `promprune` key needs no --trust-request-mm-kwargs."""

from __future__ import annotations

import pytest


def test_trust_patch_is_installed_by_the_plugin() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.renderers import online_renderer

    from vllm_promprune.engine.plugin import register

    register()
    online_renderer.validate_request_mm_kwargs(
        mm_processor_kwargs={"promprune": {"keep": 3}}, media_io_kwargs=None, trust_request_mm_kwargs=False
    )
    with pytest.raises(VLLMValidationError, match="trust-request-mm-kwargs"):
        online_renderer.validate_request_mm_kwargs(
            mm_processor_kwargs={"promprune": {}, "size": 1}, media_io_kwargs=None, trust_request_mm_kwargs=False
        )
