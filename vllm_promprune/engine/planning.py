"""Adaptive budgets in vLLM: the planning pass (design and measurements: docs/dynamic-budgets.md).

vLLM fixes an image's placeholder count in the processor, before the vision tower
runs, but an adaptive budget (`keep_mode: "adaptive"`, `prunesid_dyn`) depends on
the tower's output. So the processor (API server side) sends the image's processed
inputs to the workers once, through vLLM's `collective_rpc`, and waits:

- Worker side (`PlanningWorkerExtension`, installed with `--worker-extension-cls`):
  the family's own `embed_multimodal` runs on the image with its unplanned settings;
  `pruning.plan_budgets` measures the complexity, decides K_i and selects. The rows
  are kept in a bounded host-memory cache (`PlannedRows`) under the image's plan key
  and the complexity is returned.
- API side (`complexities`): the complexity per plan key (an LRU of floats), so a
  repeated image is not planned again; the processor then writes K_i placeholders and
  an identity that includes the planned budget.
- When the request's encoder step reaches the model, `PlannedRows.take` hands back the
  planned rows instead of encoding the image again (a miss, e.g. after eviction,
  encodes it with the planned K_i: the same budget, never a stale one).

A planning pass that cannot run answers 503 (`PlanningUnavailable`), never an engine error.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any

import torch
from prometheus_client import Counter
from vllm.exceptions import GracefulHTTPError
from vllm.multimodal.inputs import MultiModalKwargsItem
from vllm.multimodal.utils import group_and_batch_mm_kwargs
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

from ..pruning import PLANNING_PASS, PlanningPass
from ..settings import PruneSettings

PLAN_METHOD = "promprune_plan"
"""The worker method the planning pass calls (`PlanningWorkerExtension.promprune_plan`)."""
WORKER_EXTENSION = f"{__name__}.PlanningWorkerExtension"
"""Value of `--worker-extension-cls` (`worker_extension_cls`) that serves planning passes."""
CACHE_MB_ENV = "VLLM_PROMPRUNE_PLAN_CACHE_MB"
"""Host memory (MiB) of each worker's planned-rows cache; 0 encodes every planned image twice."""
DEFAULT_CACHE_MB = 256
TIMEOUT_ENV = "VLLM_PROMPRUNE_PLAN_TIMEOUT"
"""Seconds a planning pass may take before the request is answered 503."""
DEFAULT_TIMEOUT = 120.0
KNOWN_COMPLEXITIES = 65536
"""Plan keys whose measured complexity the API process remembers (LRU, 8 bytes each)."""

PLANNING_PASSES = Counter(
    "vllm:promprune_planning_passes", "Planning passes sent to the workers (one per request that needed one)."
)
PLANNED_IMAGES = Counter(
    "vllm:promprune_planned_images",
    "Adaptive-budget images by where their complexity came from: a planning pass or the API server's memory.",
    labelnames=["source"],
)
PLANNED_ROWS = Counter(
    "vllm:promprune_planned_rows",
    "Planned images reaching the encoder step: 'hit' (the planning pass's rows served), 'miss' (encoded again).",
    labelnames=["result"],
)
PLANNING_FAILURES = Counter("vllm:promprune_planning_failures", "Planning passes that failed (answered 503).")


class PlanningUnavailable(GracefulHTTPError):
    """The planning pass could not run: the request is answered 503 and nothing else is affected."""

    def __init__(self, reason: str) -> None:
        message = f"promprune: adaptive budgets need a planning pass, which failed: {reason}"
        super().__init__(message, HTTPStatus.SERVICE_UNAVAILABLE)


# ---------------------------------------------------------------- API server / offline side

RpcCall = Callable[[Any, str, tuple, float], list]
"""`call(owner, method, args, timeout)` -> one result per worker (`owner`: the engine handle)."""

_PLANNERS: dict[int, tuple[weakref.ref, RpcCall]] = {}  # id(model_config) -> (engine handle, call)
_COMPLEXITIES: OrderedDict[str, float] = OrderedDict()
_LOCK = threading.Lock()


def check_worker_extension(vllm_config: Any) -> str | None:
    """Why the engine of `vllm_config` cannot serve planning passes, or None if it can."""
    configured = vllm_config.parallel_config.worker_extension_cls
    if configured != WORKER_EXTENSION:
        return (
            f"the engine was started with worker_extension_cls={configured!r}; adaptive budgets need "
            f"{WORKER_EXTENSION!r} (`vllm-promprune serve` and PromPruneLLM set it)"
        )
    return None


def attach_async_engine(engine_client: Any, loop: asyncio.AbstractEventLoop) -> None:
    """Let the processors of `engine_client` (vLLM's AsyncLLM) plan through it (server side).

    The processor runs on the renderer's worker thread, so it submits the RPC to `loop`
    and blocks that thread only (the event loop keeps serving).
    """
    attached = _PLANNERS.get(id(engine_client.vllm_config.model_config))
    if attached is not None and attached[0]() is engine_client:
        return

    def call(client: Any, method: str, args: tuple, timeout: float) -> list:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise PlanningUnavailable("the processor ran on the server's event loop, where it cannot wait")
        return asyncio.run_coroutine_threadsafe(client.collective_rpc(method, timeout, args), loop).result(timeout)

    _attach(engine_client.vllm_config, engine_client, call)


def attach_llm(llm: Any) -> None:
    """Let the processor of an offline `vllm.LLM` plan through its engine (caller's thread)."""
    _attach(llm.llm_engine.vllm_config, llm, lambda owner, method, args, timeout: owner.collective_rpc(method, timeout, args))


def _attach(vllm_config: Any, owner: object, call: RpcCall) -> None:
    reason = check_worker_extension(vllm_config)
    if reason is not None:
        def call(owner: Any, method: str, args: tuple, timeout: float) -> list:
            raise PlanningUnavailable(reason)
    key, ref = id(vllm_config.model_config), weakref.ref(owner)
    weakref.finalize(owner, _detach, key, ref)
    _PLANNERS[key] = (ref, call)


def _detach(key: int, ref: weakref.ref) -> None:
    if key in _PLANNERS and _PLANNERS[key][0] is ref:
        del _PLANNERS[key]


def complexities(
    model_config: Any, plan_keys: Sequence[str], encode: Callable[[Sequence[int]], list[MultiModalKwargsItem]]
) -> list[float]:
    """The measured complexity of each image, by its plan key.

    Images whose key the API process has seen are not planned again; the others are
    encoded by `encode(positions)` (their processed inputs, positions into `plan_keys`)
    and planned in one pass. Raises PlanningUnavailable (503) if the pass cannot run.
    """
    with _LOCK:
        known = [_COMPLEXITIES.get(key) for key in plan_keys]
        for key, value in zip(plan_keys, known):
            if value is not None:
                _COMPLEXITIES.move_to_end(key)
    missing = [position for position, value in enumerate(known) if value is None]
    PLANNED_IMAGES.labels(source="remembered").inc(len(plan_keys) - len(missing))
    if not missing:
        return known  # type: ignore[return-value]
    planner = _PLANNERS.get(id(model_config))
    owner = None if planner is None else planner[0]()
    if owner is None:
        raise PlanningUnavailable(
            "no engine handle reached this processor: serve with `vllm-promprune serve` (its middleware "
            "hands it over) or use vllm_promprune.PromPruneLLM offline"
        )
    keys = [plan_keys[position] for position in missing]
    buffers = [bytes(buffer) for buffer in MsgpackEncoder().encode(encode(missing))]
    PLANNING_PASSES.inc()
    try:
        results = planner[1](owner, PLAN_METHOD, (keys, buffers), float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)))
    except PlanningUnavailable:
        PLANNING_FAILURES.inc()
        raise
    except Exception as error:  # the RPC's own failure (timeout, worker error): the request's, not the server's
        PLANNING_FAILURES.inc()
        raise PlanningUnavailable(f"{type(error).__name__}: {error}") from error
    values = [float(value) for value in results[0]]  # every TP rank planned the same; rank 0's answer
    PLANNED_IMAGES.labels(source="planned").inc(len(values))
    with _LOCK:
        for position, key, value in zip(missing, keys, values):
            known[position] = value
            _COMPLEXITIES[key] = value
        while len(_COMPLEXITIES) > KNOWN_COMPLEXITIES:
            _COMPLEXITIES.popitem(last=False)
    return known  # type: ignore[return-value]


# ---------------------------------------------------------------- worker side


class PlannedRows:
    """A worker's planned rows (host memory, LRU, bounded in bytes), each under its plan
    key with the settings it was planned with; taken (removed) when the request uses it."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.entries: OrderedDict[str, tuple[str, torch.Tensor, torch.device]] = OrderedDict()
        self.size = 0

    def put(self, settings: PruneSettings, rows: torch.Tensor) -> None:
        assert settings.planned is not None
        key, nbytes = settings.planned.plan_key, rows.numel() * rows.element_size()
        if nbytes > self.capacity_bytes:
            return
        self.discard(key)
        self.entries[key] = (settings.model_dump_json(), rows.to("cpu"), rows.device)
        self.size += nbytes
        while self.size > self.capacity_bytes:
            self.discard(next(iter(self.entries)))

    def discard(self, key: str) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.size -= entry[1].numel() * entry[1].element_size()

    def take(self, settings: PruneSettings, num_rows: int) -> torch.Tensor | None:
        """The rows planned for an image with exactly these settings and `num_rows`
        placeholders, back on their device; None (and counted a miss) otherwise."""
        assert settings.planned is not None
        entry = self.entries.get(settings.planned.plan_key)
        if entry is None or entry[0] != settings.model_dump_json() or entry[1].shape[0] != num_rows:
            PLANNED_ROWS.labels(result="miss").inc()
            return None
        self.discard(settings.planned.plan_key)
        PLANNED_ROWS.labels(result="hit").inc()
        return entry[1].to(entry[2])


PLANNED = PlannedRows(int(float(os.environ.get(CACHE_MB_ENV, DEFAULT_CACHE_MB)) * 2**20))
"""This worker's planned rows."""


class PlanningWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`): serves `promprune_plan`."""

    def promprune_plan(self, plan_keys: list[str], buffers: list[bytes]) -> list[float]:
        """Plan each image (one processed `MultiModalKwargsItem` each, msgpack-encoded):
        its complexity, in `plan_keys` order; its rows go to `PLANNED`."""
        items = MsgpackDecoder(list[MultiModalKwargsItem]).decode([bytearray(buffer) for buffer in buffers])
        if len(items) != len(plan_keys):
            raise ValueError(f"{len(items)} images for {len(plan_keys)} plan keys")
        runner = self.model_runner  # type: ignore[attr-defined]
        values = []
        with torch.inference_mode():
            for plan_key, item in zip(plan_keys, items):
                _, _, kwargs = next(group_and_batch_mm_kwargs([("image", item)], device=runner.device))
                planning = PlanningPass(plan_key)
                token = PLANNING_PASS.set(planning)
                try:
                    rows = runner.model.embed_multimodal(**kwargs)
                finally:
                    PLANNING_PASS.reset(token)
                if len(planning.planned) != 1:
                    raise AssertionError(f"a planning pass decided {len(planning.planned)} budgets for one image")
                planned = planning.planned[0]
                PLANNED.put(planned, rows[0])
                values.append(planned.planned.complexity)  # type: ignore[union-attr]
        return values
