"""The README's main job: a pruning-enabled server on an offline checkpoint, two requests."""

from __future__ import annotations

import base64
import io
import statistics
import time
from pathlib import Path

import requests

from ..testing.checkpoints import build_llava
from ..testing.synthetic import scene_image
from .server_process import ServerProcess

QUESTION = "What is shown in this image?"


def image_data_url(image) -> str:  # noqa: ANN001 (PIL image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_request(model: str, image_url: str, settings: dict | None, max_tokens: int = 16) -> dict:
    body: dict = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }
    if settings is not None:
        body["mm_processor_kwargs"] = {"promprune": settings}
    return body


def _post(url: str, body: dict) -> dict:
    response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text}")
    return response.json()


def _median_seconds(url: str, body: dict, repeats: int = 3) -> float:
    timings = []
    for _ in range(repeats):
        started = time.monotonic()
        _post(url, body)
        timings.append(time.monotonic() - started)
    return statistics.median(timings)


def run_demo(model_dir: Path, size: str, keep: int, port: int) -> None:
    if not (model_dir / "config.json").is_file():
        print(f"building the offline {size} LLaVA-1.5 checkpoint in {model_dir} ...", flush=True)
        build_llava(model_dir, size=size)
    serve_args = [
        "--enforce-eager", "--dtype", "float32",
        "--max-model-len", "2048", "--served-model-name", "llava-offline",
        # Distinct images per request would make these unnecessary; here the
        # same image is sent twice, so caches must not serve the second one.
        "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0",
    ]
    log = model_dir.parent / "demo-server.log"
    print(f"starting vllm-promprune serve {model_dir} (log: {log}) ...", flush=True)
    with ServerProcess(str(model_dir), serve_args, port, log) as server:
        print(f"server ready in {server.startup_seconds:.1f} s at {server.url}")
        image_url = image_data_url(scene_image(seed=7))
        # One warm-up request, then the median of three timed ones per setting.
        _post(server.url, chat_request("llava-offline", image_url, None))
        for label, settings in (("no pruning", None), (f"keep={keep}", {"keep": keep})):
            prefill = _median_seconds(server.url, chat_request("llava-offline", image_url, settings, max_tokens=1))
            full = _median_seconds(server.url, chat_request("llava-offline", image_url, settings))
            answer = _post(server.url, chat_request("llava-offline", image_url, settings))
            usage = answer["usage"]
            print(
                f"{label:>12}: usage.prompt_tokens={usage['prompt_tokens']:4d}  "
                f"median latency: 1 token {prefill:.2f} s, {usage['completion_tokens']} tokens {full:.2f} s  "
                f"answer={answer['choices'][0]['message']['content']!r}"
            )
        print("(random seeded weights: the answers are meaningless; the token counts are the point)")
    print("server stopped")
