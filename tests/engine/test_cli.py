"""`vllm-promprune serve` argument building: architecture, defaults, presets, middleware."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_promprune.tools.cli import MIDDLEWARE, WORKER_EXTENSION, main, serve_argv

PRESET = Path(__file__).resolve().parents[2] / "configs" / "cpu-demo.yaml"


def _argv(model: Path, *extra: str) -> list[str]:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--keep", type=int)
    parser.add_argument("--method")
    parser.add_argument("--promprune", type=json.loads)
    parser.add_argument("--hf-overrides", type=json.loads)
    args, rest = parser.parse_known_args([str(model), *extra])
    return serve_argv(args, rest)


def _overrides(argv: list[str]) -> dict:
    return json.loads(argv[argv.index("--hf-overrides") + 1])


def test_stock_checkpoint_gets_pruned_architecture_default_and_middleware(tiny_llava: Path) -> None:
    argv = _argv(tiny_llava, "--keep", "48", "--method", "fps", "--port", "9")
    assert _overrides(argv) == {
        "architectures": ["PromPruneLlavaForConditionalGeneration"],
        "promprune": {"keep": 48, "method": "fps"},
    }
    assert argv.count(MIDDLEWARE) == 1 and argv[-2:] == ["--port", "9"]
    assert argv[argv.index("--worker-extension-cls") + 1] == WORKER_EXTENSION  # adaptive budgets' planning pass
    assert "promprune" not in _overrides(_argv(tiny_llava))  # no default: requests decide
    own = _argv(tiny_llava, "--worker-extension-cls", "my.Extension")
    assert own.count("--worker-extension-cls") == 1 and "my.Extension" in own  # a user's own is kept


def test_the_worker_extension_is_the_planning_module_s() -> None:
    from vllm_promprune.engine import planning

    assert WORKER_EXTENSION == planning.WORKER_EXTENSION


@pytest.mark.parametrize("preset", sorted((PRESET.parent).glob("*.yaml")))
def test_presets_are_valid_and_command_line_changes_one_setting(tiny_llava: Path, preset: Path) -> None:
    import yaml

    from vllm_promprune.engine.plugin import PRUNED_ARCHITECTURES
    from vllm_promprune.settings import parse_settings

    config = yaml.safe_load(preset.read_text())
    parse_settings(config["hf-overrides"]["promprune"])
    assert config["hf-overrides"]["architectures"][0] in PRUNED_ARCHITECTURES.values()
    assert config["middleware"] == MIDDLEWARE
    argv = _argv(tiny_llava, "--config", str(preset), "--keep", "32")
    merged = _overrides(argv)["promprune"]
    assert merged == {**config["hf-overrides"]["promprune"], "keep": 32}
    assert MIDDLEWARE not in argv[: argv.index("--config")]  # the preset installs it once
    assert config["worker-extension-cls"] == WORKER_EXTENSION and "--worker-extension-cls" not in argv


def test_invalid_server_default_is_refused_before_starting(tiny_llava: Path) -> None:
    with pytest.raises(SystemExit, match="promprune.keep"):
        main(["serve", str(tiny_llava), "--keep", "0"])


def test_setup_installs_what_the_tools_need() -> None:
    # scripts/setup.sh installs the `bench` and `samples` extras: bench-serve, calibrate and
    # show must not stop with "pip install" (plots; show's sample photographs).
    import importlib.util

    assert importlib.util.find_spec("matplotlib") is not None and importlib.util.find_spec("skimage") is not None
    assert "test,bench,samples" in (PRESET.parents[1] / "scripts" / "setup.sh").read_text()
