"""Prometheus metrics for pruning, in vLLM's naming style, recorded where selection runs.

Selection runs in vLLM's worker process while `/metrics` is served by the API
server, so these metrics reach `/metrics` through prometheus_client's
multiprocess mode: `vllm-promprune serve` points PROMETHEUS_MULTIPROC_DIR at a
fresh directory for each launch (vLLM's `/metrics` then aggregates every
process). With plain `vllm serve`, set PROMETHEUS_MULTIPROC_DIR yourself.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter, Histogram

from .settings import PruneSettings

UNPRUNED = "none"

VISUAL_TOKENS_BEFORE = Counter(
    "vllm:promprune_visual_tokens_before",
    "Visual tokens the vision tower produced, before pruning, by selection method.",
    labelnames=["method"],
)
VISUAL_TOKENS_AFTER = Counter(
    "vllm:promprune_visual_tokens_after",
    "Visual tokens passed to the language model after pruning, by selection method.",
    labelnames=["method"],
)
SELECTION_SECONDS = Histogram(
    "vllm:promprune_selection_seconds",
    "Host wall time of one batched selection (tower outputs to LLM embeddings), by selection method.",
    labelnames=["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


def method_label(settings: PruneSettings, num_tokens: int) -> str:
    return settings.method if settings.prunes(num_tokens) else UNPRUNED


def record_images(settings: Sequence[PruneSettings], num_tokens: int) -> None:
    """Count each image's tokens before and after pruning."""
    for image_settings in settings:
        label = method_label(image_settings, num_tokens)
        VISUAL_TOKENS_BEFORE.labels(method=label).inc(num_tokens)
        VISUAL_TOKENS_AFTER.labels(method=label).inc(image_settings.kept_tokens(num_tokens))


def record_selection(method: str, seconds: float) -> None:
    SELECTION_SECONDS.labels(method=method).observe(seconds)
