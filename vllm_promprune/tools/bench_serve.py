"""`vllm-promprune bench-serve`: throughput, TTFT and KV use under concurrency.

Drives a pruning-enabled OpenAI server with vLLM's own load generator
(`vllm.benchmarks.serve`, the machinery behind `vllm bench serve`) on its
`random-mm` dataset, so every request carries a distinct image. Budgets travel
as sampling parameters (`vllm_xargs`), one setting per run; "none" sends an
explicit `keep: null`, so a server's default budget does not apply. The server this
command starts has prefix caching and the multimodal processor cache off, so
no request is served from a cache. KV-cache usage is the peak of the server's
`vllm:kv_cache_usage_perc` gauge, polled during each run.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import requests

from .server_process import ServerProcess

SERVED_NAME = "llava-bench"
NO_PRUNING = "none"


class ServedFamily(NamedTuple):
    """How the benchmark serves one model family."""

    image_size: tuple[int, int]  # (width, height) of every request's image
    image_tokens: int  # prompt tokens of one such image, unpruned
    max_model_len: int


SERVED_FAMILIES = {
    "LlavaForConditionalGeneration": ServedFamily((336, 336), 576, 2048),
    # Base view + 2 x 2 crops: 2880 content tokens and 48 row newlines.
    "LlavaNextForConditionalGeneration": ServedFamily((672, 672), 2928, 4096),
    "Qwen2_5_VLForConditionalGeneration": ServedFamily((448, 448), 256, 2048),  # 16 x 16 merged tokens
    "Qwen2VLForConditionalGeneration": ServedFamily((448, 448), 256, 2048),
    "Qwen3VLForConditionalGeneration": ServedFamily((512, 512), 256, 2048),  # patch 16: 16 x 16 merged tokens
    "Qwen3VLMoeForConditionalGeneration": ServedFamily((512, 512), 256, 2048),
}


def served_family(model_dir: Path) -> ServedFamily:
    """The `ServedFamily` of the checkpoint in `model_dir` (by its architecture)."""
    architecture = (json.loads((model_dir / "config.json").read_text()).get("architectures") or ["?"])[0]
    if architecture not in SERVED_FAMILIES:
        raise SystemExit(f"bench-serve: {model_dir} is a {architecture}; supported: {sorted(SERVED_FAMILIES)}")
    return SERVED_FAMILIES[architecture]


@dataclass(frozen=True)
class RunResult:
    budget: str  # "none" or the keep value
    method: str
    concurrency: int
    requests: int
    failed: int
    request_throughput: float  # requests / s
    output_token_throughput: float  # generated tokens / s
    total_token_throughput: float  # (prompt + generated) tokens / s
    total_input_tokens: int  # from the server's usage.prompt_tokens
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_mean_ms: float
    kv_cache_peak_percent: float


class KvCachePoller:
    """Polls the server's KV-cache usage gauge in the background; keeps the peak."""

    def __init__(self, url: str, interval: float = 0.25) -> None:
        self.url, self.interval, self.peak = url, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for line in requests.get(f"{self.url}/metrics", timeout=2).text.splitlines():
                    if line.startswith("vllm:kv_cache_usage_perc"):
                        self.peak = max(self.peak, 100.0 * float(line.rsplit(" ", 1)[1]))
            except (requests.RequestException, ValueError):
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> KvCachePoller:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def load_run(
    url: str, served_name: str, tokenizer: str, budget: str, method: str, concurrency: int,
    num_prompts: int, input_len: int, output_len: int, seed: int, image_size: tuple[int, int],
    references: dict[str, float] | None = None,
) -> RunResult:
    """One `vllm bench serve` run against `url` with one pruning setting; `references`
    ({"phi_ref": ...}) go with every pruned request (adaptive budgets read them)."""
    from vllm.benchmarks import serve as vllm_bench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    vllm_bench.add_cli_args(parser)
    if budget == NO_PRUNING:  # explicit opt-out, so a server default budget cannot apply
        extra_body: dict = {"mm_processor_kwargs": {"promprune": {"keep": None}}}
    else:
        xargs = {"promprune_keep": int(budget), "promprune_method": method}
        xargs.update({f"promprune_{name}": value for name, value in (references or {}).items()})
        extra_body = {"vllm_xargs": xargs}
    args = parser.parse_args([
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
        "--base-url", url, "--model", served_name, "--tokenizer", tokenizer,
        "--dataset-name", "random-mm", "--num-prompts", str(num_prompts),
        "--random-input-len", str(input_len), "--random-output-len", str(output_len),
        "--random-range-ratio", "0", "--random-mm-base-items-per-request", "1",
        "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
        "--random-mm-bucket-config", f"{{({image_size[1]}, {image_size[0]}, 1): 1.0}}",
        "--max-concurrency", str(concurrency), "--request-rate", "inf",
        "--ignore-eos", "--temperature", "0", "--seed", str(seed), "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot", "--metric-percentiles", "50,99",
        "--extra-body", json.dumps(extra_body),
    ])
    with KvCachePoller(url) as poller:
        result = vllm_bench.main(args)
    return RunResult(
        budget=budget, method=method if budget != NO_PRUNING else NO_PRUNING, concurrency=concurrency,
        requests=result["completed"], failed=result.get("failed", 0),
        request_throughput=result["request_throughput"],
        output_token_throughput=result["output_throughput"],
        total_token_throughput=result["total_token_throughput"],
        total_input_tokens=result["total_input_tokens"],
        ttft_p50_ms=result["p50_ttft_ms"], ttft_p99_ms=result["p99_ttft_ms"],
        tpot_mean_ms=result["mean_tpot_ms"],
        kv_cache_peak_percent=poller.peak,
    )


def sweep_settings(budgets: list[str], methods: list[str]) -> list[tuple[str, str]]:
    """(budget, method) pairs: no pruning once, every pruned budget with every method."""
    return [(NO_PRUNING, NO_PRUNING)] * (NO_PRUNING in budgets) + [
        (budget, method) for budget in budgets if budget != NO_PRUNING for method in methods
    ]


def ratios(results: list[RunResult], keep: str, methods: list[str]) -> list[str]:
    """Per concurrency: throughput(keep)/throughput(no pruning), and method vs uniform at keep."""
    lines = []
    for concurrency in sorted({r.concurrency for r in results}):
        at = {(r.budget, r.method): r.request_throughput for r in results if r.concurrency == concurrency}
        base = at.get((NO_PRUNING, NO_PRUNING))
        for method in methods:
            pruned = at.get((keep, method))
            if base and pruned:
                lines.append(f"c={concurrency}: throughput(keep={keep}, {method}) / throughput(no pruning) = {pruned / base:.2f}")
        if at.get((keep, "promprune")) and at.get((keep, "uniform")):
            lines.append(
                f"c={concurrency}: throughput(promprune) / throughput(uniform) at keep={keep} = "
                f"{at[(keep, 'promprune')] / at[(keep, 'uniform')]:.2f}"
            )
    return lines


def _table_order(result: RunResult) -> tuple[int, bool, int, str]:
    """Concurrency, then no pruning first, then larger budgets first, then method."""
    pruned = result.budget != NO_PRUNING
    return (result.concurrency, pruned, -int(result.budget) if pruned else 0, result.method)


def markdown(results: list[RunResult]) -> str:
    header = (
        "| concurrency | budget | method | req/s | output tok/s | total tok/s | input tokens | "
        "TTFT p50 ms | TTFT p99 ms | TPOT ms | peak KV % |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {r.concurrency} | {r.budget} | {r.method} | {r.request_throughput:.2f} | {r.output_token_throughput:.1f} | "
        f"{r.total_token_throughput:.1f} | {r.total_input_tokens} | {r.ttft_p50_ms:.0f} | {r.ttft_p99_ms:.0f} | "
        f"{r.tpot_mean_ms:.1f} | {r.kv_cache_peak_percent:.1f} |"
        for r in sorted(results, key=_table_order)
    ]
    return "\n".join([header, *rows])


def plot(results: list[RunResult], out: Path, full_tokens: int) -> list[Path]:
    """Throughput vs budget per concurrency, and TTFT p50 vs concurrency per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def tokens(budget: str) -> int:
        return full_tokens if budget == NO_PRUNING else int(budget)

    paths = []
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for concurrency in sorted({r.concurrency for r in results}):
        for method in sorted({r.method for r in results if r.method != NO_PRUNING}):
            points = sorted(
                (tokens(r.budget), r.request_throughput)
                for r in results
                if r.concurrency == concurrency and r.method in (method, NO_PRUNING)
            )
            axis.plot(*zip(*points), marker="o", label=f"c={concurrency}, {method}")
    axis.set(xlabel=f"visual tokens per image ({full_tokens} = no pruning)", ylabel="requests / s",
             title="Throughput vs budget")
    axis.set_xscale("log", base=2)
    budget_ticks = sorted({tokens(r.budget) for r in results})
    axis.set_xticks(budget_ticks, [str(t) for t in budget_ticks])
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    paths.append(out / "throughput_vs_budget.png")
    figure.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for budget, method in sorted({(r.budget, r.method) for r in results}, key=lambda p: (-tokens(p[0]), p[1])):
        points = sorted((r.concurrency, r.ttft_p50_ms) for r in results if (r.budget, r.method) == (budget, method))
        label = "no pruning" if budget == NO_PRUNING else f"keep={budget}, {method}"
        axis.plot(*zip(*points), marker="o", label=label)
    axis.set(xlabel="concurrency", ylabel="TTFT p50 (ms)", title="Time to first token vs concurrency")
    axis.set_xscale("log", base=2)
    concurrency_ticks = sorted({r.concurrency for r in results})
    axis.set_xticks(concurrency_ticks, [str(c) for c in concurrency_ticks])
    axis.set_yscale("log")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    paths.append(out / "ttft_vs_concurrency.png")
    figure.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(figure)
    return paths


def main(args: argparse.Namespace) -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # fail before a long sweep, not after
        raise SystemExit("bench-serve writes plots with matplotlib: pip install -e '.[bench]'")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir or f".scratch/models/{args.family}-small")
    if args.url is None and not (model_dir / "config.json").is_file():
        from ..testing.checkpoints import BUILDERS

        print(f"building the offline small {args.family} checkpoint in {model_dir} ...", flush=True)
        BUILDERS[args.family](model_dir, size="small")
    family = served_family(model_dir)
    settings = sweep_settings(args.budgets, args.methods)
    name = args.served_model_name or SERVED_NAME
    references = {name: value for name, value in (("phi_ref", args.phi_ref), ("entropy_ref", args.entropy_ref))
                  if value is not None}
    results: list[RunResult] = []

    def run_all(url: str) -> None:
        # Warm-up so the first measured run does not pay one-time costs.
        load_run(
            url, name, str(model_dir), NO_PRUNING, NO_PRUNING, 1, 2, args.input_len, args.output_len, args.seed,
            family.image_size,
        )
        for concurrency in args.concurrency:
            num_prompts = max(args.min_prompts, args.prompts_per_slot * concurrency)
            for budget, method in settings:
                result = load_run(
                    url, name, str(model_dir), budget, method, concurrency, num_prompts,
                    args.input_len, args.output_len, args.seed, family.image_size, references,
                )
                results.append(result)
                print(f"RESULT {json.dumps(asdict(result))}", flush=True)

    started = time.monotonic()
    if args.url is not None:
        run_all(args.url)
    else:
        serve_args = [
            "--enforce-eager", "--dtype", "float32", "--max-model-len", str(family.max_model_len),
            "--served-model-name", SERVED_NAME,
            "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0",
        ]
        with ServerProcess(str(model_dir), serve_args, args.port, out / "server.log") as server:
            print(f"server ready in {server.startup_seconds:.1f} s", flush=True)
            run_all(server.url)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    table = markdown(results)
    (out / "results.md").write_text(table + "\n")
    print(f"\n{table}\n")
    for line in ratios(results, args.ratio_keep, [m for m in args.methods]):
        print(line)
    for path in plot(results, out, full_tokens=family.image_tokens):
        print(f"wrote {path}")
    print(f"sweep took {time.monotonic() - started:.0f} s; results in {out}")
