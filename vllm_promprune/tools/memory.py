"""Peak memory that a piece of torch code allocates, on any device.

CUDA has allocator statistics; the CPU allocator has none, so on the CPU the tensors
the code creates are counted as they are made and freed (`PeakTensorBytes`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorBytes(TorchDispatchMode):
    """Counts the storages that operations dispatched under it create, while they live.

    `peak` is the largest number of bytes held at once by such storages. Storages the
    code received (its inputs) and views or in-place results on them are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        received = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        result = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(result):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in received or key in self._tracked:
                continue
            size = storage.nbytes()
            self._tracked.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, size)
        return result

    def _freed(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live -= size


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes `fn` allocates beyond what was allocated before it ran (its result freed)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with PeakTensorBytes() as counter:
        fn()
    return counter.peak
