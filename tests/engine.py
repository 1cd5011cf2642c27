"""Helpers shared by the engine tests (real vLLM on the tiny offline checkpoints)."""

from __future__ import annotations

Result = tuple[list[int], list[int]]


def greedy_params(max_tokens: int = 8, logprobs: int | None = None):  # noqa: ANN201
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs)


def run(llm, requests: list[dict], **sampling) -> list[Result]:  # noqa: ANN001
    """(prompt token ids, generated token ids) per request, greedy, no early stop."""
    outputs = llm.generate(requests, greedy_params(**sampling), use_tqdm=False)
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outputs]


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
