"""The torchvision import hook: active only where torchvision's compiled ops fail to load."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_promprune.engine import torchvision_compat


def _fake_torchvision(root: Path, loadable: bool) -> Path:
    package = root / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    extension = package / "_C.so"
    if loadable:
        # Any real shared library loads with torch.ops.load_library.
        shutil.copy(Path(torch.__file__).parent / "lib" / "libtorch_global_deps.so", extension)
    else:
        extension.write_bytes(b"not an ELF file")
    return root


def _run(code: str, path: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(path)!r}); {code}"],
        capture_output=True, text=True, check=True,
    )
    return result.stdout.strip()


@pytest.mark.parametrize("loadable", [True, False])
def test_detection_follows_whether_the_extension_loads(tmp_path: Path, loadable: bool) -> None:
    root = _fake_torchvision(tmp_path, loadable)
    out = _run("from vllm_promprune.engine import torchvision_compat as c; print(c.torchvision_ops_load())", root)
    assert out == str(loadable)


@pytest.mark.parametrize("loadable", [True, False])
def test_pth_is_written_only_when_needed(tmp_path: Path, loadable: bool) -> None:
    root = _fake_torchvision(tmp_path / "pkgs", loadable)
    site = tmp_path / "site"
    site.mkdir()
    code = (
        "from pathlib import Path; from vllm_promprune.engine import torchvision_compat as c; "
        f"print(c.install_pth(Path({str(site)!r})))"
    )
    _run(code, root)
    assert (site / torchvision_compat.PTH_NAME).exists() is (not loadable)


def test_hook_defines_ops_only_for_unloadable_extension(tmp_path: Path) -> None:
    code = (
        "from vllm_promprune.engine import torchvision_compat as c; c.install(); import torchvision, torch; "
        "print(hasattr(torch.ops.torchvision, 'nms'))"
    )
    assert _run(code, _fake_torchvision(tmp_path / "bad", loadable=False)) == "True"
    assert _run(code, _fake_torchvision(tmp_path / "good", loadable=True)) == "False"


def test_stub_op_raises_a_clear_error(tmp_path: Path) -> None:
    code = (
        "from vllm_promprune.engine import torchvision_compat as c; c.install(); import torchvision, torch\n"
        "try:\n torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)\n"
        "except RuntimeError as e: print(e)"
    )
    assert "compiled ops are unavailable" in _run(code, _fake_torchvision(tmp_path, loadable=False))


def test_real_environment_imports_torchvision_transforms() -> None:
    # In this project's environment the hook (if installed) must make this work.
    subprocess.run([sys.executable, "-c", "import torchvision.transforms.v2"], check=True)
