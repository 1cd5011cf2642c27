"""`vllm-promprune eval` end to end: a server it starts on the tiny LLaVA checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_promprune.testing.synthetic import scene_image, textured_image
from vllm_promprune.tools.cli import main

from .conftest import free_port


def test_eval_reports_retention_accuracy_and_throughput(tiny_llava: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for seed in range(3):
        textured_image(seed).save(images / f"textured-{seed}.png")
        scene_image(seed).save(images / f"scene-{seed}.jpg")
        lines.append({"image": f"images/textured-{seed}.png", "question": "What is shown?",
                      "answer": "no random-weight model says this"})
        lines.append({"image": f"images/scene-{seed}.jpg", "question": "Describe the shapes."})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    bench = tmp_path / "bench.json"  # a bench-serve run's rows, for the plot's throughput axis
    bench.write_text(json.dumps([{"budget": b, "method": m, "concurrency": 4, "request_throughput": t}
                                 for b, m, t in [("none", "none", 1.0), ("100000", "promprune", 1.0),
                                                 ("8", "promprune", 2.5), ("8", "uniform", 2.6)]]))
    out = tmp_path / "out"

    main(["eval", "--data", str(data), "--model-dir", str(tiny_llava), "--budgets", "100000", "8",
          "--methods", "promprune", "uniform", "--mu", "0.0", "1.0", "--max-tokens", "6", "--concurrency", "4",
          "--bench-serve", str(bench), "--bench-concurrency", "4", "--port", str(free_port()), "--out", str(out)])

    report = json.loads((out / "eval.json").read_text())
    assert report["records"] == 6
    results = {(r["budget"], r["method"], r["mu"]): r for r in report["results"]}
    pruned = [("promprune", 0.0), ("promprune", 1.0), ("uniform", None)]
    assert list(results) == [("none", "none", None)] + [(b, m, mu) for b in ("100000", "8") for m, mu in pruned]
    unpruned = results["none", "none", None]
    assert unpruned["retention"] == 1.0 and len(unpruned["answers"]) == 6
    for method, mu in pruned:  # keep >= N: the image is not pruned, every answer is retained
        assert results["100000", method, mu]["retention"] == 1.0
        assert results["100000", method, mu]["answers"] == unpruned["answers"]
        assert results["100000", method, mu]["mean_prompt_tokens"] == unpruned["mean_prompt_tokens"]
        assert results["8", method, mu]["mean_prompt_tokens"] == unpruned["mean_prompt_tokens"] - 576 + 8
    # mu reaches the server: all-coverage (0.0) and all-saliency (1.0) keep different tokens on these images.
    assert results["8", "promprune", 0.0]["answers"] != results["8", "promprune", 1.0]["answers"]
    for result in results.values():
        assert result["exact"] == 0.0 and result["contains"] == 0.0  # judged on the 3 records with an answer
        assert 0.0 <= result["retention"] <= 1.0 and result["requests_per_s"] > 0
    table = (out / "eval.md").read_text()
    assert table.count("\n") == 9 and "| 8 | uniform |" in table and "| 8 | promprune mu=1 |" in table
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_needs_a_server_or_a_checkpoint(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"image": "https://example.com/a.jpg", "question": "Q"}\n')
    with pytest.raises(SystemExit, match="give --url"):
        main(["eval", "--data", str(data), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="--budgets takes positive integers"):
        main(["eval", "--data", str(data), "--url", "http://127.0.0.1:9", "--budgets", "0"])
