"""`vllm-promprune eval`: arguments, reading records, scoring answers, joining bench-serve throughput
(a run against a live server: tests/engine/test_server.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_promprune.tools.cli import main
from vllm_promprune.tools.evaluate import (
    Record,
    Setting,
    bench_throughput,
    contains,
    is_exact,
    load_records,
    markdown,
    normalise,
    score,
    settings_grid,
)


def test_normalise_drops_case_punctuation_articles_and_spacing() -> None:
    assert normalise("  The Red  CAR. ") == "red car"
    assert normalise("An apple, a pear!") == "apple pear"
    assert normalise("theatre") == "theatre"  # articles only as whole words


def test_exact_and_contains() -> None:
    assert is_exact("A dog.", ["dog", "puppy"]) and not is_exact("a big dog", ["dog"])
    assert contains("I see a big dog here", ["dog"]) and not contains("hotdog", ["dog"])
    assert not contains("anything", ["", "the"])  # empty references never match


def test_score_counts_retention_and_accuracy_only_over_judged_records() -> None:
    records = [Record("a.png", "q", ("cat",)), Record("b.png", "q", ()), Record("c.png", "q", ("two dogs", "2 dogs"))]
    unpruned = ["a cat", "blue", "two dogs"]
    result = score(Setting("64", "promprune"), ["cat", "blue", "three dogs"], unpruned, records, seconds=2.0,
                   prompt_tokens=[10, 20, 30])
    assert result.retention == pytest.approx(1 / 3)  # only "blue" is identical to its unpruned answer
    assert result.exact == pytest.approx(1 / 2)  # "cat" of the two records with references
    assert result.contains == pytest.approx(1 / 2)
    assert result.requests_per_s == 1.5 and result.mean_prompt_tokens == 20
    no_references = score(Setting("64", "uniform"), ["x"], ["x"], [Record("a.png", "q", ())], 1.0, [5])
    assert no_references.exact is None and no_references.contains is None and no_references.retention == 1.0
    assert "| 64 | uniform | 1.000 | – | – | 1.00 | 5.0 |" in markdown([no_references])


def test_records_are_read_with_errors_naming_the_line(tmp_path: Path) -> None:
    (tmp_path / "cat.png").write_bytes(b"png")
    data = tmp_path / "data.jsonl"
    data.write_text(
        '{"image": "cat.png", "question": "What?", "answer": "cat"}\n\n'
        '{"image": "https://example.com/x.jpg", "question": "Q", "answers": ["a", "b"]}\n'
        '{"image": "cat.png", "question": "No answer"}\n'
    )
    records = load_records(data)
    assert [r.answers for r in records] == [("cat",), ("a", "b"), ()]
    assert records[0].image == str(tmp_path / "cat.png") and records[1].image.startswith("https://")
    for line, message in [
        ("not json", "data.jsonl:2: not JSON"),
        ('{"question": "Q"}', 'data.jsonl:2: each line needs "image"'),
        ('{"image": "cat.png", "question": "Q", "answers": "cat"}', 'data.jsonl:2: "answer" must be a string'),
        ('{"image": "missing.png", "question": "Q"}', "data.jsonl:2: image missing.png not found"),
    ]:
        data.write_text('{"image": "cat.png", "question": "Q"}\n' + line + "\n")
        with pytest.raises(SystemExit, match=message):
            load_records(data)


def test_bench_serve_throughput_by_budget_and_method(tmp_path: Path) -> None:
    rows = [{"budget": "none", "method": "none", "concurrency": 8, "request_throughput": 1.0},
            {"budget": "64", "method": "promprune", "concurrency": 8, "request_throughput": 3.0},
            {"budget": "64", "method": "promprune", "concurrency": 1, "request_throughput": 2.0}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(rows))
    assert bench_throughput(path, 8) == {("none", "none"): 1.0, ("64", "promprune"): 3.0}
    with pytest.raises(SystemExit, match="no runs at concurrency 32"):
        bench_throughput(path, 32)


def test_grid_runs_unpruned_first_and_promprune_once_per_mu() -> None:
    assert settings_grid(["none", "64", "16"], ["promprune", "uniform"], []) == [
        Setting("none", "none"), Setting("64", "promprune"), Setting("64", "uniform"),
        Setting("16", "promprune"), Setting("16", "uniform"),
    ]
    grid = settings_grid(["64"], ["promprune", "uniform"], [0.3, 0.6])
    assert grid == [Setting("none", "none"), Setting("64", "promprune", 0.3), Setting("64", "promprune", 0.6),
                    Setting("64", "uniform")]
    assert [setting.label for setting in grid[1:]] == ["promprune mu=0.3", "promprune mu=0.6", "uniform"]


def test_eval_needs_a_server_or_a_checkpoint(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"image": "https://example.com/a.jpg", "question": "Q"}\n')
    with pytest.raises(SystemExit, match="give --url"):
        main(["eval", "--data", str(data), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="--budgets takes positive integers"):
        main(["eval", "--data", str(data), "--url", "http://127.0.0.1:9", "--budgets", "0"])
