"""Prometheus metrics for pruning, in vLLM's naming style, recorded where selection runs.

Selection runs in vLLM's worker process while `/metrics` is served by the API
server, so these metrics reach `/metrics` through prometheus_client's
multiprocess mode: `vllm-promprune serve` points PROMETHEUS_MULTIPROC_DIR at a
fresh directory for each launch (vLLM's `/metrics` then aggregates every
process). With plain `vllm serve`, set PROMETHEUS_MULTIPROC_DIR yourself.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from ..settings import PruneSettings

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

SELECTION_FAILURES = Counter(
    "vllm:promprune_selection_failures",
    "Selections that raised inside the engine and fell back to evenly strided tokens, by selection method.",
    labelnames=["method"],
)


def record_image(settings: PruneSettings, num_content: int, num_stock: int) -> None:
    """Count one image's visual tokens before (stock placeholders) and after pruning."""
    label = settings.method if settings.prunes(num_content) else UNPRUNED
    VISUAL_TOKENS_BEFORE.labels(method=label).inc(num_stock)
    VISUAL_TOKENS_AFTER.labels(method=label).inc(settings.placeholders(num_content, num_stock))


def record_selection(method: str, seconds: float) -> None:
    SELECTION_SECONDS.labels(method=method).observe(seconds)


def record_selection_failure(method: str) -> None:
    SELECTION_FAILURES.labels(method=method).inc()
