"""bench-serve's sweep plan and ratio arithmetic (the load runs themselves are a benchmark, not a test)."""

from __future__ import annotations

from vllm_promprune.tools.bench_serve import NO_PRUNING, RunResult, markdown, ratios, sweep_settings


def _result(budget: str, method: str, concurrency: int, throughput: float) -> RunResult:
    return RunResult(budget, method, concurrency, 8, 0, throughput, 1.0, 1.0, 100, 1.0, 2.0, 3.0, 4.0)


def test_sweep_runs_no_pruning_once_and_every_budget_with_every_method() -> None:
    assert sweep_settings(["none", "128", "64"], ["promprune", "uniform"]) == [
        (NO_PRUNING, NO_PRUNING), ("128", "promprune"), ("128", "uniform"), ("64", "promprune"), ("64", "uniform"),
    ]
    assert sweep_settings(["64"], ["uniform"]) == [("64", "uniform")]


def test_ratios_per_concurrency() -> None:
    results = [
        _result(NO_PRUNING, NO_PRUNING, 1, 1.0), _result("64", "promprune", 1, 3.0), _result("64", "uniform", 1, 4.0),
        _result(NO_PRUNING, NO_PRUNING, 8, 2.0), _result("64", "promprune", 8, 7.0), _result("64", "uniform", 8, 7.0),
    ]
    lines = ratios(results, "64", ["promprune", "uniform"])
    assert "c=1: throughput(keep=64, promprune) / throughput(no pruning) = 3.00" in lines
    assert "c=1: throughput(promprune) / throughput(uniform) at keep=64 = 0.75" in lines
    assert "c=8: throughput(keep=64, uniform) / throughput(no pruning) = 3.50" in lines
    assert "c=8: throughput(promprune) / throughput(uniform) at keep=64 = 1.00" in lines
    table = markdown(results).splitlines()
    assert len(table) == 2 + len(results) and table[2].startswith("| 1 | none |")


def test_each_family_is_served_with_its_own_image_size(tmp_path) -> None:
    import json

    import pytest

    from vllm_promprune.testing.checkpoints import BUILDERS
    from vllm_promprune.tools.bench_serve import SERVED_FAMILIES, served_family

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"]}))
    assert served_family(tmp_path).image_size == (448, 448)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MllamaForConditionalGeneration"]}))
    with pytest.raises(SystemExit, match="supported"):
        served_family(tmp_path)
    assert len(SERVED_FAMILIES) == len(BUILDERS)  # every family bench-serve can build, it can serve
