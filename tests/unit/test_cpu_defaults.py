"""vLLM CPU defaults: set only when unset, only on the CPU backend, and the same in scripts/env.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_promprune.tools import cpu_defaults
from vllm_promprune.tools.cpu_defaults import CPU_DEFAULTS, apply_cpu_defaults

ENV_SH = Path(__file__).resolve().parents[2] / "scripts" / "env.sh"


def _sourced(cwd: Path, **preset: str) -> dict[str, str]:
    """The variables `source scripts/env.sh` adds or changes in a bare shell started with `preset`."""
    script = f'env -0 > before; source "{ENV_SH}"; env -0 > after'
    subprocess.run(["bash", "-c", script], cwd=cwd, env={"PATH": os.environ["PATH"], **preset}, check=True)

    def read(name: str) -> dict[str, str]:
        entries = (cwd / name).read_text().split("\0")
        return dict(entry.split("=", 1) for entry in entries if entry)

    before, after = read("before"), read("after")
    return {name: value for name, value in after.items() if before.get(name) != value and name != "_"}


def test_env_sh_exports_exactly_the_cli_defaults(tmp_path: Path) -> None:
    assert _sourced(tmp_path) == cpu_defaults.cpu_defaults(tmp_path)


def test_env_sh_keeps_values_already_set(tmp_path: Path) -> None:
    preset = {name: "kept" for name in CPU_DEFAULTS}
    assert _sourced(tmp_path, **preset) == {}


def test_cpu_backend_sets_only_unset_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cpu_defaults, "vllm_runs_on_cpu", lambda: True)
    monkeypatch.chdir(tmp_path)
    environ = {"HF_HUB_OFFLINE": "0", "VLLM_CPU_KVCACHE_SPACE": "4", "OTHER": "x"}
    applied = apply_cpu_defaults(environ)
    assert applied == {
        "VLLM_CACHE_ROOT": str(tmp_path / ".scratch" / "vllm-cache"),
        "TRANSFORMERS_OFFLINE": "1",
    }
    assert environ == {"HF_HUB_OFFLINE": "0", "VLLM_CPU_KVCACHE_SPACE": "4", "OTHER": "x", **applied}
    assert apply_cpu_defaults(environ) == {}  # idempotent


def test_other_backends_get_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_defaults, "vllm_runs_on_cpu", lambda: False)
    environ: dict[str, str] = {}
    assert apply_cpu_defaults(environ) == {}
    assert environ == {}


def test_backend_check_leaves_huggingface_hub_unimported() -> None:
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: the CLI's imports and the
    backend check must come before it, or the offline default would have no effect."""
    code = (
        "import sys; import vllm_promprune.tools.cli; "
        "from vllm_promprune.tools.cpu_defaults import vllm_runs_on_cpu; vllm_runs_on_cpu(); "
        "print('huggingface_hub' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
