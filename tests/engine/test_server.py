"""`vllm-promprune serve` end to end: a live OpenAI server on the tiny checkpoint.

One server serves the module, started the way a newcomer starts it: with the CPU demo
preset, in an environment holding only PATH and HOME (the CLI applies vLLM's CPU defaults
itself), and `eval` runs against it too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from vllm_promprune.testing.synthetic import scene_image, textured_image
from vllm_promprune.tools import server_process
from vllm_promprune.tools.cli import main
from vllm_promprune.tools.cpu_defaults import vllm_runs_on_cpu
from vllm_promprune.tools.demo import chat_request, image_data_url
from vllm_promprune.tools.server_process import ServerProcess

from .conftest import free_port

MODEL_NAME = "llava-offline"  # from the preset
PRESET = Path(__file__).resolve().parents[2] / "configs" / "cpu-demo.yaml"
NUM_TOKENS = 576
SERVER_DEFAULT_KEEP = 32


@pytest.fixture(scope="module")
def server(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # The CPU demo preset, with its default budget changed on the command line.
    # No --trust-request-mm-kwargs: pruning keys need no trust.
    args = ["--config", str(PRESET), "--keep", str(SERVER_DEFAULT_KEEP)]
    env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"]}
    if "PYTHONPATH" in os.environ:  # the checkout under test (e.g. a worktree beside the venv's editable install)
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(str(tiny_llava), args, free_port(), log, env, inherit_env=False) as process:
        yield process


@pytest.mark.skipif(not vllm_runs_on_cpu(), reason="the defaults apply to vLLM's CPU backend only")
def test_serve_applies_the_cpu_defaults_itself(server: ServerProcess) -> None:
    # Without them vLLM's CPU backend refuses to start on these machines ("Available memory on
    # node 0 ... is less than desired CPU memory utilization"), as it did for a newcomer who
    # had not sourced scripts/env.sh (issue #24). The server answering at all is the rest.
    assert set(server.env) <= {"PATH", "HOME", "PYTHONPATH"}
    assert "VLLM_CPU_KVCACHE_SPACE=1" in server.log_path.read_text()  # the CLI says which defaults it applied


def _chat(server: ServerProcess, settings: dict | None, seed: int = 0, **extra: object) -> requests.Response:
    body = chat_request(MODEL_NAME, image_data_url(scene_image(seed)), settings, max_tokens=4)
    body.update(extra)
    return requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)


def _prompt_tokens(server: ServerProcess, settings: dict | None, seed: int = 0, **extra: object) -> int:
    response = _chat(server, settings, seed, **extra)
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


@pytest.fixture(scope="module")
def text_tokens(server: ServerProcess) -> int:
    """Prompt tokens of the chat request besides the image."""
    text = _prompt_tokens(server, {"keep": None}) - NUM_TOKENS  # keep=None opts out of the default
    assert text > 0
    return text


def test_usage_prompt_tokens_follow_per_request_and_default_budgets(server: ServerProcess, text_tokens: int) -> None:
    text = text_tokens
    assert _prompt_tokens(server, None) == text + SERVER_DEFAULT_KEEP
    assert _prompt_tokens(server, {"keep": 64}) == text + 64
    assert _prompt_tokens(server, {"mu": 0.3}) == text + SERVER_DEFAULT_KEEP  # merged key by key
    assert _prompt_tokens(server, {"keep": 10_000}) == text + NUM_TOKENS


def test_vllm_xargs_route_equals_mm_processor_kwargs_route(server: ServerProcess, text_tokens: int) -> None:
    via_xargs = _chat(server, None, vllm_xargs={"promprune_keep": 48, "promprune_method": "fps"})
    via_mm = _chat(server, {"keep": 48, "method": "fps"})
    assert via_xargs.status_code == via_mm.status_code == 200, via_xargs.text
    assert via_xargs.json()["usage"]["prompt_tokens"] == text_tokens + 48
    assert via_xargs.json()["choices"][0]["message"] == via_mm.json()["choices"][0]["message"]
    # both routes at once, consistent, is fine; inconsistent is a 400 naming both
    assert _prompt_tokens(server, {"keep": 48}, vllm_xargs={"promprune_keep": 48}) == text_tokens + 48
    clash = _chat(server, {"keep": 48}, vllm_xargs={"promprune_keep": 40})
    assert clash.status_code == 400
    assert "vllm_xargs.promprune_keep=40" in clash.json()["error"]["message"]


def test_other_processor_kwargs_still_need_trust(server: ServerProcess) -> None:
    body = chat_request(MODEL_NAME, image_data_url(scene_image(0)), None, max_tokens=4)
    body["mm_processor_kwargs"] = {"promprune": {"keep": 8}, "do_resize": False}
    response = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 400
    assert "trust-request-mm-kwargs" in response.json()["error"]["message"]


BAD_SETTINGS = [
    ({"keep": 0}, "promprune.keep"),
    ({"keep": -1}, "promprune.keep"),
    ({"keep": 1.5}, "promprune.keep"),
    ({"keep": "64"}, "promprune.keep"),
    ({"keep": True}, "promprune.keep"),
    ({"keep": 2**40}, "promprune.keep"),
    ({"keep": [64, 32]}, "promprune.keep"),  # one image, two budgets
    ({"ratio": 0}, "promprune.ratio"),
    ({"ratio": 1.5}, "promprune.ratio"),
    ({"ratio": -0.2}, "promprune.ratio"),
    ({"ratio": "half"}, "promprune.ratio"),
    ({"keep": 8, "ratio": 0.5}, "keep or ratio"),
    ({"method": "magic"}, "promprune.method"),
    ({"method": 3}, "promprune.method"),
    ({"method": "prunesid_dyn", "keep": 8, "phi_ref": 0}, "promprune.phi_ref"),  # the preset sets a valid one
    ({"method": "prunesid_dyn", "ratio": 0.5}, "set keep, not ratio"),
    ({"method": "prunesid_dyn", "keep": 8, "phi_ref": 0.4, "complexity": "spectral_entropy"}, "promprune.complexity"),
    ({"order": "random"}, "promprune.order"),
    ({"wat": 1}, "promprune.wat"),
    ({"mu": "high"}, "promprune.mu"),
    ({"mu": 2}, "promprune.mu"),
    ({"tau": 0}, "promprune.tau"),
    ({"kr_min": 0.9, "kr_max": 0.1}, "kr_min"),
    ({"coverage": "kmeans"}, "promprune.coverage"),
    ({"method": "uniform", "mu": 0.4}, "promprune.mu"),
    ({"method": "random", "seed": -1}, "promprune.seed"),
    ({"method": "vispruner", "important_ratio": 3}, "promprune.important_ratio"),
]


def test_bad_settings_get_400_naming_the_field_and_server_keeps_serving(server: ServerProcess, text_tokens: int) -> None:
    assert len({repr(settings) for settings, _ in BAD_SETTINGS}) >= 20
    for settings, field in BAD_SETTINGS:
        response = _chat(server, settings)
        assert response.status_code == 400, (settings, response.text)
        assert field in response.json()["error"]["message"], (settings, response.json())
    not_an_object = _chat(server, None, mm_processor_kwargs={"promprune": 64})
    assert not_an_object.status_code == 400 and "must be an object" in not_an_object.text
    assert _prompt_tokens(server, {"keep": 16}, seed=1) == text_tokens + 16


def _metric_values(server: ServerProcess) -> dict[str, float]:
    """`/metrics` samples of the pruning metrics, keyed by 'name{labels}'."""
    values: dict[str, float] = {}
    for line in requests.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        if line.startswith("vllm:promprune_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_count_tokens_before_and_after_and_time_selection(server: ServerProcess) -> None:
    before = _metric_values(server)
    assert _chat(server, {"keep": 16, "method": "fps"}, seed=5).status_code == 200
    after = _metric_values(server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('vllm:promprune_visual_tokens_before_total{method="fps"}') == NUM_TOKENS
    assert delta('vllm:promprune_visual_tokens_after_total{method="fps"}') == 16
    assert delta('vllm:promprune_selection_seconds_count{method="fps"}') == 1
    assert delta('vllm:promprune_selection_seconds_sum{method="fps"}') > 0


def test_prunesid_dyn_is_planned_per_request_through_both_routes(server: ServerProcess, text_tokens: int) -> None:
    """Adaptive budgets over HTTP: the preset's phi_ref, both routes, one planning pass per
    new (image, settings), the pass's rows served, another reference another budget."""
    before = _metric_values(server)
    dyn = {"method": "prunesid_dyn", "keep": 32}  # phi_ref: the preset's (server default)
    via_mm = _chat(server, dyn, seed=30)
    via_xargs = _chat(server, None, seed=30, vllm_xargs={"promprune_method": "prunesid_dyn", "promprune_keep": 32})
    assert via_mm.status_code == via_xargs.status_code == 200, via_mm.text
    budget = via_mm.json()["usage"]["prompt_tokens"] - text_tokens
    assert via_xargs.json()["usage"]["prompt_tokens"] == text_tokens + budget and 1 <= budget < NUM_TOKENS
    assert via_xargs.json()["choices"][0]["message"] == via_mm.json()["choices"][0]["message"]
    phi_ref = yaml.safe_load(PRESET.read_text())["hf-overrides"]["promprune"]["phi_ref"]
    halved = _prompt_tokens(server, {**dyn, "phi_ref": 2 * phi_ref}, seed=30) - text_tokens
    assert abs(budget - 2 * halved) <= 1
    after = _metric_values(server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("vllm:promprune_planning_passes_total") == 2  # the second route's request was remembered
    assert delta('vllm:promprune_planned_images_total{source="remembered"}') == 1
    assert delta('vllm:promprune_planned_rows_total{result="hit"}') == 2
    assert delta("vllm:promprune_planning_failures_total") == 0


def _eval_data(tmp_path: Path) -> Path:
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
    return data


def test_eval_reports_retention_accuracy_and_throughput(server: ServerProcess, tmp_path: Path) -> None:
    data = _eval_data(tmp_path)
    bench = tmp_path / "bench.json"  # a bench-serve run's rows, for the plot's throughput axis
    bench.write_text(json.dumps([{"budget": b, "method": m, "concurrency": 4, "request_throughput": t}
                                 for b, m, t in [("none", "none", 1.0), ("100000", "promprune", 1.0),
                                                 ("8", "promprune", 2.5), ("8", "uniform", 2.6)]]))
    out = tmp_path / "out"

    main(["eval", "--data", str(data), "--url", server.url, "--budgets", "100000", "8",
          "--methods", "promprune", "uniform", "--mu", "0.0", "1.0", "--max-tokens", "6", "--concurrency", "4",
          "--bench-serve", str(bench), "--bench-concurrency", "4", "--out", str(out)])

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
        assert results["8", method, mu]["mean_prompt_tokens"] == unpruned["mean_prompt_tokens"] - NUM_TOKENS + 8
    # mu reaches the server: all-coverage (0.0) and all-saliency (1.0) keep different tokens on these images.
    assert results["8", "promprune", 0.0]["answers"] != results["8", "promprune", 1.0]["answers"]
    for result in results.values():
        assert result["exact"] == 0.0 and result["contains"] == 0.0  # judged on the 3 records with an answer
        assert 0.0 <= result["retention"] <= 1.0 and result["requests_per_s"] > 0
    table = (out / "eval.md").read_text()
    assert table.count("\n") == 9 and "| 8 | uniform |" in table and "| 8 | promprune mu=1 |" in table
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_serves_the_checkpoint_it_is_given(server: ServerProcess, tiny_llava: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # `eval --model-dir` starts a server on the checkpoint and evaluates against it; this
    # module's server (same checkpoint) stands in for a second one started just for this.
    started = []

    class ModuleServer:
        def __init__(self, model: str, serve_args: list[str], port: int, log_path: Path) -> None:
            started.append((model, serve_args, port))

        def __enter__(self) -> ServerProcess:
            return server

        def __exit__(self, *exc_info: object) -> None:
            return None

    monkeypatch.setattr(server_process, "ServerProcess", ModuleServer)
    out = tmp_path / "out"
    main(["eval", "--data", str(_eval_data(tmp_path)), "--model-dir", str(tiny_llava), "--served-model-name",
          MODEL_NAME, "--budgets", "8", "--methods", "uniform", "cdpruner", "--max-tokens", "2", "--port", "8799",
          "--out", str(out)])
    [(model, serve_args, port)] = started
    assert (model, port) == (str(tiny_llava), 8799)
    assert serve_args[serve_args.index("--served-model-name") + 1] == MODEL_NAME
    report = json.loads((out / "eval.json").read_text())
    methods = [(r["budget"], r["method"]) for r in report["results"]]
    assert methods == [("none", "none"), ("8", "uniform"), ("8", "cdpruner")]  # cdpruner: by each record's question
    unpruned, *pruned = (r["mean_prompt_tokens"] for r in report["results"])
    assert pruned == [unpruned - NUM_TOKENS + 8] * 2
