"""Helpers shared by the engine tests (real vLLM on the tiny offline checkpoints)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

Result = tuple[list[int], list[int]]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a test server)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(llm) -> Iterator[object]:  # noqa: ANN001
    """Yield an offline engine (`vllm.LLM` or `PromPruneLLM`); shut its engine core down after."""
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()


def load_reference(model_dir: Path, hf_model_class: type, reference_class: type):  # noqa: ANN201
    """`reference_class` (vllm_promprune.reference) around the transformers model in
    `model_dir`, eager attention (the references read attention weights)."""
    from transformers import AutoProcessor

    model = hf_model_class.from_pretrained(model_dir, attn_implementation="eager")
    return reference_class(model, AutoProcessor.from_pretrained(model_dir))


def image_request(prompt: str, images: list, settings: dict | None = None) -> dict:
    """An offline request with one image (or several) and optional `promprune` settings."""
    request: dict = {"prompt": prompt, "multi_modal_data": {"image": images[0] if len(images) == 1 else images}}
    if settings is not None:
        request["mm_processor_kwargs"] = {"promprune": settings}
    return request


def greedy_params(max_tokens: int = 8, logprobs: int | None = None):  # noqa: ANN201
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs)


def run(llm, requests: list[dict], **sampling) -> list[Result]:  # noqa: ANN001
    """(prompt token ids, generated token ids) per request, greedy, no early stop."""
    outputs = llm.generate(requests, greedy_params(**sampling), use_tqdm=False)
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outputs]


def assert_bit_identical(stock_llm, pruned_llm, stock_requests: list[dict], pruned_requests: list[dict]) -> None:  # noqa: ANN001
    """Greedy runs of the two engines give the same prompt ids, tokens and top-3 logprob floats."""
    stock = stock_llm.generate(stock_requests, greedy_params(logprobs=3), use_tqdm=False)
    pruned = pruned_llm.generate(pruned_requests, greedy_params(logprobs=3), use_tqdm=False)
    assert len(stock) == len(pruned) == len(stock_requests)
    for s, p in zip(stock, pruned):
        assert p.prompt_token_ids == s.prompt_token_ids
        assert p.outputs[0].token_ids == s.outputs[0].token_ids
        assert p.outputs[0].logprobs == s.outputs[0].logprobs  # exact floats


def start_recording_positions(model) -> None:  # noqa: ANN001
    """Record the positions every LM forward pass receives (run through `LLM.apply_model`).

    Wraps the decoder's `forward` (vLLM's compile decorator bypasses module hooks;
    the engine runs eager here).
    """
    recorded: list = []
    decoder = model.language_model.model
    forward = decoder.forward

    def recording_forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        recorded.append(kwargs["positions"].detach().cpu().clone())
        return forward(*args, **kwargs)

    decoder.forward = recording_forward
    model.recorded_positions = recorded


def take_recorded_positions(model):  # noqa: ANN001, ANN201
    """All positions recorded since the last call, concatenated over forward passes (None: none)."""
    import torch

    recorded = list(model.recorded_positions)
    model.recorded_positions.clear()
    return torch.cat(recorded, dim=-1) if recorded else None


# --------------------------------------------------------------------------- selection margins
# Engine-vs-reference tests compare two pipelines whose tower outputs differ by float
# rounding; they pick the same tokens only where the selections' margins exceed it.
# The helpers below measure that difference on the engine's own requests and check that
# the cases' selections do not move under noise well above it.

TOWER_FUNCTIONS = ("clip_tower_output", "qwen_tower_outputs")
"""Module-level functions of the plugin's model modules that run the vision tower for pruning."""


def allow_apply_model() -> None:
    """Let `LLM.apply_model` ship test functions to the worker (set before the engine starts)."""
    import os

    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"


def start_recording_towers(model) -> None:  # noqa: ANN001
    """Record every `TowerOutput` the pruning path computes (run through `LLM.apply_model`).

    Replaces the tower function in the model's module by a wrapper that returns its
    result unchanged; `take_recorded_towers` restores it.
    """
    import sys

    module = sys.modules[type(model).__module__]
    name = next(n for n in TOWER_FUNCTIONS if hasattr(module, n))
    original = getattr(module, name)
    recorded: list = []

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = original(*args, **kwargs)
        recorded.extend(result[0] if isinstance(result, tuple) else [result])  # Qwen: (towers, stock)
        return result

    setattr(module, name, recording)
    model.tower_recording = (module, name, original, recorded)


def take_recorded_towers(model) -> bytes:  # noqa: ANN001
    """The recorded tower outputs as `torch.save` bytes of [(hidden, saliency, keys, projected)],
    projected by the model's own projector; stops recording."""
    import io

    import torch

    module, name, original, recorded = model.tower_recording
    setattr(module, name, original)
    del model.tower_recording
    if hasattr(model, "visual"):  # Qwen2.5-VL: the tower's merger
        from vllm_promprune.models.qwen2_5_vl import merger_projection

        project = merger_projection(model.visual)
    else:
        project = model.multi_modal_projector
    with torch.inference_mode():
        rows = [(t.hidden, t.saliency, t.keys, project(t.hidden[:, 1:])) for t in recorded]
    buffer = io.BytesIO()
    torch.save(rows, buffer)
    return buffer.getvalue()


def engine_tower_outputs(llm, requests: list[dict]) -> list[tuple]:  # noqa: ANN001
    """(hidden, saliency, keys, projected) the engine computes for each request's one image.

    Each request runs alone and must prune its image with settings not seen before
    (a cached image would not run the tower).
    """
    import io

    import torch

    towers = []
    for request in requests:
        llm.apply_model(start_recording_towers)
        llm.generate([request], greedy_params(max_tokens=1), use_tqdm=False)
        (blob,) = llm.apply_model(take_recorded_towers)
        recorded = torch.load(io.BytesIO(blob))
        assert len(recorded) == 1, f"expected one tower run for the request, got {len(recorded)}"
        towers.append(recorded[0])
    return towers


def max_differences(engine: list[tuple], reference: list[tuple]) -> dict[str, float]:
    """Max abs difference per field (hidden, saliency, keys, projected) over all images."""
    fields = ("hidden", "saliency", "keys", "projected")
    worst = dict.fromkeys(fields, 0.0)
    for ours, theirs in zip(engine, reference, strict=True):
        for field, a, b in zip(fields, ours, theirs):
            if a is not None and b is not None:
                assert a.shape == b.shape, (field, a.shape, b.shape)
                worst[field] = max(worst[field], float((a.float() - b.float()).abs().max()))
    return worst


def jittered(tower, jitter: dict[str, float], generator):  # noqa: ANN001, ANN201
    """`tower` (a TowerOutput) plus Gaussian noise of std `jitter[field]` on hidden, saliency and keys."""
    import torch

    from vllm_promprune.pruning import TowerOutput

    def noisy(values, field: str):  # noqa: ANN001, ANN202
        if values is None:
            return None
        return values + jitter[field] * torch.randn(values.shape, generator=generator, dtype=values.dtype)

    return TowerOutput(noisy(tower.hidden, "hidden"), noisy(tower.saliency, "saliency"), noisy(tower.keys, "keys"))


@contextmanager
def recorded_selections() -> Iterator[list]:
    """Record every choice the pruning pipeline makes while the block runs.

    Selecting methods: the index tensor `reduce_tokens` returns; VisionZip (merging):
    its plan (dominant rows, targets, merged rows and their assignment).
    """
    import vllm_promprune.methods.visionzip as visionzip
    import vllm_promprune.pruning as pruning
    from vllm_promprune.methods import METHODS

    record: list = []
    reduce_tokens, plan = pruning.reduce_tokens, visionzip._plan

    def recording_reduce(method: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = reduce_tokens(method, *args, **kwargs)
        if not METHODS[method].merges:
            record.append(result.clone())
        return result

    def recording_plan(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = plan(*args, **kwargs)
        record.extend(part.clone() for part in result)
        return result

    pruning.reduce_tokens, visionzip._plan = recording_reduce, recording_plan
    try:
        yield record
    finally:
        pruning.reduce_tokens, visionzip._plan = reduce_tokens, plan


def selections(prune, tower) -> list:  # noqa: ANN001
    """Every choice `prune(tower)` makes (see `recorded_selections`)."""
    import torch

    with torch.inference_mode(), recorded_selections() as record:
        prune(tower)
    return record


def same_selections(a: list, b: list) -> bool:
    import torch

    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
