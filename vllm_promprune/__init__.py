"""vllm-promprune: visual-token pruning for vision-language models served by vLLM.

Kept import-light: a `.pth` hook (see `torchvision_compat`) imports this package
in every Python process of a CPU-only environment.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("select_tokens", "METHODS"):
        from . import methods

        return getattr(methods, name)
    raise AttributeError(f"module 'vllm_promprune' has no attribute {name!r}")


__all__ = ["METHODS", "select_tokens"]
