"""No host read inside a selection's per-step loop: each method reads a fixed, listed number of values per call.

A host read (`.item()`, `int(t)`, `bool(t)`, `.tolist()`, `nonzero`, a boolean index, ...)
makes the host wait for the device to finish its queue; inside a greedy loop that is one
stall per step (docs: vllm-integration.md, "CUDA graphs, syncs and memory"). Every method
runs here under a dispatch mode that records such operations. The expected count is
stated per method and asserted exactly for two budgets and two token counts: a read inside
a loop would scale with the number of steps, rounds or tokens.

On CPU, `.tolist()` and `.numpy()` read memory without dispatching an operation, so the
recorder also wraps those two methods. Reads inside a library kernel (e.g. the error
check of `torch.linalg.eigvalsh` / `svd` on CUDA) are below the dispatcher and not seen.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vllm_promprune.methods import METHODS, TokenBatch, reduce_tokens

aten = torch.ops.aten

# Operations whose result (or output size) depends on tensor values read by the host.
_READING_OPS = {
    aten._local_scalar_dense,  # .item(), int(t), float(t), bool(t), t used as an index
    aten.item,
    aten.is_nonzero,
    aten.equal,
    aten.allclose,
    aten.nonzero,
    aten.masked_select,
    aten.bincount,  # sizes its output from the largest value
    aten.histc,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.unique_dim_consecutive,
}
_INDEXING_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _boolean_index(args: tuple[Any, ...]) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None)


def _device_to_host(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if func.overloadpacket is aten._to_copy:
        target = kwargs.get("device")
        return args[0].device.type != "cpu" and target is not None and torch.device(target).type == "cpu"
    if func.overloadpacket is aten.copy_:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


def _caller() -> str:
    """file:line of the innermost project frame (for the failure message)."""
    frames = [f for f in traceback.extract_stack() if "vllm_promprune" in f.filename]
    return f"{frames[-1].filename.rsplit('vllm_promprune/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"


class HostReads(TorchDispatchMode):
    """Records every operation dispatched under it that reads tensor values on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        packet = func.overloadpacket
        reads = (
            packet in _READING_OPS
            or (packet in _INDEXING_OPS and _boolean_index(args))
            or (packet is aten.repeat_interleave and isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None)
            or _device_to_host(func, args, kwargs)
        )
        if reads:
            self.record(str(func))
        return func(*args, **kwargs)

    def record(self, what: str) -> None:
        self.reads.append(f"{what} at {_caller()}")


@contextmanager
def host_reads() -> Iterator[HostReads]:
    """The dispatch recorder, plus `.tolist()` / `.numpy()` (no dispatch on CPU tensors)."""
    recorder = HostReads()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(name: str) -> Callable[..., Any]:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            recorder.record(f"Tensor.{name}")
            return originals[name](self, *args, **kwargs)

        return read

    try:
        for name in originals:
            setattr(torch.Tensor, name, wrap(name))
        with recorder:
            yield recorder
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_the_recorder_sees_every_kind_of_host_read() -> None:
    values = torch.tensor([0.0, 2.0, 0.0, 3.0])
    reads: list[Callable[[], object]] = [
        lambda: values.sum().item(),
        lambda: int(values.argmax()),
        lambda: float(values.max()),
        lambda: bool(values.any()),
        lambda: values.tolist(),
        lambda: values.numpy(),
        lambda: values.nonzero(),
        lambda: values[values > 1],
        lambda: values.clone().__setitem__(values > 1, torch.tensor([7.0, 8.0])),
        lambda: torch.equal(values, values),
        lambda: torch.bincount(values.long()),
        lambda: values.unique(),
        lambda: values.long().repeat_interleave(values.long()),
        lambda: values[: values.argmax()],
    ]
    for index, read in enumerate(reads):
        with host_reads() as recorder:
            read()
        assert recorder.reads, f"read {index} was not recorded"
    no_reads: list[Callable[[], object]] = [
        lambda: values.argmax(),
        lambda: values.masked_fill(values > 1, 0.0),
        lambda: values[torch.tensor([1, 3])],
        lambda: torch.where(values > 1, values, -values).sort(),
        lambda: values.long().repeat_interleave(values.long(), output_size=5),
    ]
    for index, call in enumerate(no_reads):
        with host_reads() as recorder:
            call()
        assert recorder.reads == [], f"call {index}: {recorder.reads}"


# --------------------------------------------------------------------------- the methods


def _batch(images: int, num_tokens: int, seed: int) -> TokenBatch:
    """Clustered random images: groups of similar tokens, so NMS and DPP rounds do real work."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(images, 6, 48, generator=g)
    assignment = torch.randint(6, (images, num_tokens + 1), generator=g)
    pre = centres.gather(1, assignment[..., None].expand(-1, -1, 48)) + 0.4 * torch.randn(images, num_tokens + 1, 48, generator=g)
    features = pre[:, 1:] @ torch.randn(48, 64, generator=g)
    saliency = torch.randn(images, num_tokens, generator=g).softmax(dim=-1)
    keys = pre[:, :, :16] + torch.randn(images, num_tokens + 1, 16, generator=g)
    instruction = torch.randn(images, 5, 64, generator=g)
    return TokenBatch(features, saliency, pre[:, 1:], pre[:, 0], keys, instruction)


# (method, options, host reads per call, per image (True) or per batch). Each read is
# named; none is inside a loop over steps, rounds or tokens.
EXPECTED_READS: list[tuple[str, dict[str, object], int, bool]] = [
    # promprune.py stage_one_budgets: nonzero() of the images whose split needs the
    # eigenvalues (skipped for the others); promprune_select: int(K_sal.min()), the
    # stage-2 step count.
    ("promprune", {}, 2, False),
    ("promprune", {"fixed_share": 0.5}, 1, False),  # only the stage-2 step count
    ("promprune", {"entropy": "attention"}, 1, False),
    ("promprune", {"entropy": "feature_norm", "coverage": "fps"}, 1, False),
    ("promprune", {"coverage": "fl"}, 2, False),
    ("promprune", {"coverage": "fps", "mu": 0.9}, 2, False),
    # prunesid.py prunesid_select, per image: int(sizes.max()), the largest group,
    # which bounds the NMS rounds.
    ("prunesid", {}, 1, True),
    ("prunesid", {"pca": "lowrank"}, 1, True),
    ("divprune", {}, 0, False),
    ("vispruner", {}, 0, False),
    ("vispruner", {"important_ratio": 0.2}, 0, False),
    ("visionzip", {}, 0, False),
    ("fps", {}, 0, False),
    ("facility_location", {}, 0, False),
    ("coverage", {}, 0, False),
    ("uniform", {}, 0, False),
    ("random", {}, 0, False),
    ("saliency", {}, 0, False),
    ("cdpruner", {}, 0, False),
    ("cdpruner", {"relevance_sign": -1, "theta": 0.5}, 0, False),
]


def test_every_registered_method_has_an_expected_count() -> None:
    assert {method for method, *_ in EXPECTED_READS} == set(METHODS)


@pytest.mark.parametrize(("method", "options", "reads", "per_image"), EXPECTED_READS)
@pytest.mark.parametrize("images", [1, 3])
def test_host_reads_per_call_are_fixed(method: str, options: dict[str, object], reads: int, per_image: bool, images: int) -> None:
    expected = reads * (images if per_image else 1)
    for num_tokens, keeps in ((96, (8, 40)), (160, (12, 70))):
        batch = _batch(images, num_tokens, seed=num_tokens)
        for keep in keeps:
            with host_reads() as recorder:
                reduce_tokens(method, batch, keep, METHODS[method].options(**options))
            assert len(recorder.reads) == expected, (
                f"{method} {options}, N={num_tokens}, K={keep}: {len(recorder.reads)} host reads, "
                f"expected {expected}:\n" + "\n".join(recorder.reads)
            )
