"""A selection method that always raises, registered for the engine-safety tests only.

Loaded into every vLLM process of a test server through
`VLLM_PROMPRUNE_METHODS=failing_method` (with this folder on PYTHONPATH): it
exercises the last-resort guard around selection, which no built-in method
should ever reach.
"""

from __future__ import annotations

from vllm_promprune.methods import MethodSpec, NoOptions, TokenBatch, register_method

FAILING_METHOD = "always_fails"  # tests/engine/test_server_load.py names it too (it must not import this module)


def _raise(batch: TokenBatch, keep: int, options: NoOptions) -> None:
    raise RuntimeError(f"injected selection failure ({len(batch.features)} image(s), keep {keep})")


register_method(FAILING_METHOD, MethodSpec(NoOptions, _raise, ("features",)))
