"""Helpers shared by the engine tests (real vLLM on the tiny offline checkpoints)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

Result = tuple[list[int], list[int]]


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
