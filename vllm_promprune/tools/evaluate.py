"""`vllm-promprune eval`: answer quality at each budget and method, next to throughput.

Sends every record of a JSONL file (one object per line: `image` (file path relative to
the file, http(s) URL or `sample:NAME`), `question`, optional `answer` (string) or
`answers` (list)) to a pruning-enabled
OpenAI server, once per setting of the grid budget × method (× PromPrune's `mu` with
`--mu`: the quality side of calibrating mu) plus once unpruned, greedy, and reports per
setting:

- `retention`: the share of answers identical (exact string) to the unpruned answer for
  the same record (always; 1.0 for the unpruned row by definition);
- `exact` / `contains` accuracy where records carry reference answers (normalised:
  lower case, punctuation and articles dropped, spaces collapsed; `contains`: a
  reference appears in the answer);
- `requests_per_s` of the pass (records sent with `--concurrency` in flight), and the
  mean `usage.prompt_tokens`.

Writes `eval.json` (also every answer), `eval.md` and `pareto.png` (quality vs
requests/s per setting). With `--bench-serve results.json` (a `bench-serve` run against
the same server) the plot's throughput axis takes that run's requests/s at
`--bench-concurrency` for the same budget and method instead of the eval pass's own.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from .show import SAMPLE_PREFIX, SAMPLES, load_image

NO_PRUNING = "none"
SERVED_NAME = "eval"
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass(frozen=True)
class Record:
    image: str  # file path or http(s) URL
    question: str
    answers: tuple[str, ...]  # reference answers (may be empty)


def load_records(path: Path) -> list[Record]:
    """The records of a JSONL file; SystemExit naming the line of the first bad one."""
    if not path.is_file():
        raise SystemExit(f"eval: --data {path}: no such file")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"eval: {path}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as error:
            raise SystemExit(f"{where}: not JSON ({error.msg})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("image"), str) or not isinstance(raw.get("question"), str):
            raise SystemExit(f'{where}: each line needs "image" (path or URL) and "question" strings')
        answers = raw.get("answers", [raw["answer"]] if "answer" in raw else [])
        if not isinstance(answers, list) or not all(isinstance(answer, str) for answer in answers):
            raise SystemExit(f'{where}: "answer" must be a string, "answers" a list of strings')
        image = raw["image"]
        if image.startswith(SAMPLE_PREFIX):
            if image.removeprefix(SAMPLE_PREFIX) not in SAMPLES:
                raise SystemExit(f"{where}: unknown sample {image!r}; samples: {', '.join(SAMPLES)}")
        elif not image.startswith(("http://", "https://")):
            image_path = Path(image) if Path(image).is_absolute() else path.parent / image
            if not image_path.is_file():
                raise SystemExit(f"{where}: image {image} not found (paths are relative to the data file)")
            image = str(image_path)
        records.append(Record(image, raw["question"], tuple(answers)))
    if not records:
        raise SystemExit(f"eval: {path} has no records")
    return records


def normalise(text: str) -> str:
    """Lower case, punctuation and English articles removed, whitespace collapsed."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def is_exact(answer: str, references: Sequence[str]) -> bool:
    return normalise(answer) in {normalise(reference) for reference in references}


def contains(answer: str, references: Sequence[str]) -> bool:
    answer = f" {normalise(answer)} "
    return any(f" {normalise(reference)} " in answer for reference in references if normalise(reference))


def setting_label(method: str, mu: float | None) -> str:
    """A setting's method as tables and plots name it: `promprune mu=0.5` when mu is set."""
    return method if mu is None else f"{method} mu={mu:g}"


class Setting(NamedTuple):
    budget: str  # "none" or the keep value
    method: str  # "none" for the unpruned pass
    mu: float | None = None  # PromPrune's mu (None: the server's default)

    @property
    def label(self) -> str:
        return setting_label(self.method, self.mu)


def settings_grid(budgets: Sequence[str], methods: Sequence[str], mus: Sequence[float]) -> list[Setting]:
    """Unpruned first, then every budget × method; `promprune` once per mu when `mus` are given."""
    grid = [Setting(NO_PRUNING, NO_PRUNING)]
    for budget in budgets:
        if budget == NO_PRUNING:
            continue
        for method in methods:
            grid += [Setting(budget, method, mu) for mu in mus] if method == "promprune" and mus else [Setting(budget, method)]
    return grid


@dataclass
class SettingResult:
    budget: str  # "none" or the keep value
    method: str  # "none" for the unpruned pass
    mu: float | None  # PromPrune's mu when set by --mu
    requests_per_s: float
    mean_prompt_tokens: float
    retention: float
    exact: float | None  # None: no record has reference answers
    contains: float | None
    answers: list[str] = field(repr=False)


def score(setting: Setting, answers: Sequence[str], unpruned: Sequence[str], records: Sequence[Record],
          seconds: float, prompt_tokens: Sequence[int]) -> SettingResult:
    """One setting's figures from its answers (in record order) and the unpruned answers."""
    judged = [(answer, record.answers) for answer, record in zip(answers, records, strict=True) if record.answers]
    return SettingResult(
        budget=setting.budget,
        method=setting.method,
        mu=setting.mu,
        requests_per_s=len(answers) / seconds,
        mean_prompt_tokens=sum(prompt_tokens) / len(prompt_tokens),
        retention=sum(a == b for a, b in zip(answers, unpruned, strict=True)) / len(answers),
        exact=sum(is_exact(a, refs) for a, refs in judged) / len(judged) if judged else None,
        contains=sum(contains(a, refs) for a, refs in judged) / len(judged) if judged else None,
        answers=list(answers),
    )


def image_urls(records: Sequence[Record]) -> list[str]:
    """Each record's image as the request carries it: its URL, or a data URL (encoded once per run)."""
    from .demo import image_data_url

    return [record.image if record.image.startswith(("http://", "https://")) else image_data_url(load_image(record.image))
            for record in records]


def run_setting(url: str, model: str, records: Sequence[Record], images: Sequence[str], setting: Setting,
                max_tokens: int, concurrency: int) -> tuple[list[str], list[int], float]:
    """(answers, prompt tokens, wall seconds) of one pass over the records, whose images are
    given as `images` (URLs or data URLs, `image_urls`)."""
    import requests

    if setting.budget == NO_PRUNING:  # explicit opt-out, so a server default budget cannot apply
        pruning: dict[str, object] = {"mm_processor_kwargs": {"promprune": {"keep": None}}}
    else:
        xargs = {"promprune_keep": int(setting.budget), "promprune_method": setting.method}
        pruning = {"vllm_xargs": xargs if setting.mu is None else {**xargs, "promprune_mu": setting.mu}}

    def ask(index: int) -> tuple[str, int]:
        content = [{"type": "image_url", "image_url": {"url": images[index]}},
                   {"type": "text", "text": records[index].question}]
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "temperature": 0.0, **pruning}
        response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=900)
        if response.status_code != 200:
            raise SystemExit(f"eval: the server refused budget {setting.budget} {setting.label}: {response.text[:500]}")
        reply = response.json()
        return reply["choices"][0]["message"]["content"] or "", int(reply["usage"]["prompt_tokens"])

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        replies = list(pool.map(ask, range(len(records))))
    seconds = time.perf_counter() - started
    return [answer for answer, _ in replies], [tokens for _, tokens in replies], seconds


def _first_model(url: str) -> str:
    import requests

    models = requests.get(f"{url}/v1/models", timeout=60).json().get("data") or []
    if not models:
        raise SystemExit(f"eval: {url}/v1/models lists no model")
    return models[0]["id"]


def markdown(results: Sequence[SettingResult]) -> str:
    def figure(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = [
        "| budget | method | retention | exact | contains | req/s | prompt tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.budget} | {setting_label(r.method, r.mu)} | {r.retention:.3f} | {figure(r.exact)} | "
                     f"{figure(r.contains)} | {r.requests_per_s:.2f} | {r.mean_prompt_tokens:.1f} |")
    return "\n".join(lines)


def bench_throughput(path: Path, concurrency: int) -> dict[tuple[str, str], float]:
    """bench-serve's requests/s by (budget, method) at `concurrency`."""
    rows = json.loads(path.read_text())
    found = {(str(row["budget"]), str(row["method"])): float(row["request_throughput"])
             for row in rows if int(row["concurrency"]) == concurrency}
    if not found:
        raise SystemExit(f"eval: {path} has no runs at concurrency {concurrency}")
    return found


def pareto_plot(results: Sequence[SettingResult], out: Path, throughput: dict[tuple[str, str], float] | None,
                concurrency: int) -> Path:
    """Quality (retention; contains accuracy when answers were given) vs requests/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for quality, marker in (("retention", "o"), ("contains", "s")):
        points = []
        for r in results:
            value = getattr(r, quality)
            speed = r.requests_per_s if throughput is None else throughput.get((r.budget, r.method))
            if value is not None and speed is not None:
                label = "no pruning" if r.budget == NO_PRUNING else f"{r.budget}/{setting_label(r.method, r.mu)}"
                points.append((speed, value, label))
        if not points:
            continue
        axis.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=quality)
        for speed, value, label in points:
            axis.annotate(label, (speed, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
    source = "eval pass" if throughput is None else f"bench-serve, concurrency {concurrency}"
    axis.set_xlabel(f"requests/s ({source})")
    axis.set_ylabel("share of records")
    axis.set_ylim(-0.05, 1.05)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path = out / "pareto.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(args: argparse.Namespace) -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("eval writes a plot with matplotlib: pip install -e '.[bench]'")
    if (args.url is None) == (args.model_dir is None):
        raise SystemExit("eval: give --url (a running server) or --model-dir (a checkpoint to serve)")
    records = load_records(Path(args.data))
    for budget in args.budgets:
        if budget != NO_PRUNING and not (budget.isdigit() and int(budget) >= 1):
            raise SystemExit(f"eval: --budgets takes positive integers, got {budget!r}")
    throughput = None if args.bench_serve is None else bench_throughput(Path(args.bench_serve), args.bench_concurrency)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mu and "promprune" not in args.methods:
        raise SystemExit("eval: --mu varies PromPrune's split: add promprune to --methods")
    grid = settings_grid(args.budgets, args.methods, args.mu or [])

    images = image_urls(records)

    def evaluate(url: str, model: str) -> list[SettingResult]:
        unpruned, tokens, seconds = run_setting(url, model, records, images, grid[0], args.max_tokens, args.concurrency)
        results = [score(grid[0], unpruned, unpruned, records, seconds, tokens)]
        for setting in grid[1:]:
            answers, tokens, seconds = run_setting(url, model, records, images, setting, args.max_tokens,
                                                   args.concurrency)
            results.append(score(setting, answers, unpruned, records, seconds, tokens))
            print(f"budget {setting.budget:>6} {setting.label:<20} retention {results[-1].retention:.3f}", flush=True)
        return results

    if args.url is not None:
        results = evaluate(args.url, args.served_model_name or _first_model(args.url))
    else:
        from .server_process import ServerProcess

        name = args.served_model_name or SERVED_NAME
        serve_args = ["--enforce-eager", "--max-model-len", str(args.max_model_len), "--served-model-name", name,
                      "--limit-mm-per-prompt", '{"image": 1, "video": 0}']
        with ServerProcess(args.model_dir, serve_args, args.port, out / "server.log") as server:
            results = evaluate(server.url, name)
    (out / "eval.json").write_text(json.dumps(
        {"data": str(args.data), "records": len(records), "results": [asdict(r) for r in results]}, indent=2) + "\n")
    table = markdown(results)
    (out / "eval.md").write_text(table + "\n")
    print(f"\n{table}\n")
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'}, {pareto_plot(results, out, throughput, args.bench_concurrency)}")
