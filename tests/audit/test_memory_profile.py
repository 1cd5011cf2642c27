"""The selections vLLM's memory profile runs cover the memory of every selection a request can ask for.

vLLM sizes the KV cache from a profiling run; the pruned models run
`memory_profile_settings` there on a maximum-N image. Here the peak bytes each
selection allocates (`PeakTensorBytes`, counted as tensors are made and freed) are
compared: the largest profiled peak must be at least the peak of every accepted
method at every budget and with the options that change its path, but for the K-long
index rows of greedy methods past the profiled budget (`PROFILE_INDEX_BYTES`).
"""

from __future__ import annotations

import pytest
import torch

from vllm_promprune.families.qwen_vision import QWEN_TOWER_INPUTS
from vllm_promprune.methods import METHODS, TokenBatch, reduce_tokens
from vllm_promprune.pruning import CLS_TOWER_INPUTS, PROFILE_INDEX_BYTES, memory_profile_settings, profile_keep
from vllm_promprune.tools.memory import peak_bytes

CPU = torch.device("cpu")
OPTION_VARIANTS = {
    "promprune": [{}, {"mu": 0.0}, {"mu": 1.0}, {"mu": 0.9, "tau": 0.2}, {"coverage": "fps"}, {"coverage": "fl"},
                  {"entropy": "attention"}, {"entropy": "feature_norm"}, {"fixed_share": 0.5}],
    "prunesid": [{}, {"pca": "lowrank"}],
    "cdpruner": [{}, {"theta": 0.5}, {"relevance_sign": -1}],
}


def instruction_lengths(tokens: int) -> tuple[int, ...]:
    """CDPruner's instruction lengths M checked: the profile's one token, a short question,
    and 3 N (longer than the image, so the relevance runs in row blocks)."""
    return 1, 7, 3 * tokens


def _clustered_batch(batch: int, tokens: int, width: int, pre_width: int, seed: int) -> TokenBatch:
    """Tokens around 12 centres (a mixed PromPrune split at the default mu), as towers give."""
    g = torch.Generator().manual_seed(seed)

    def clustered(dim: int) -> torch.Tensor:
        centres = torch.randn(batch, 12, dim, generator=g)
        members = torch.randint(0, 12, (batch, tokens), generator=g)
        return centres.gather(1, members[:, :, None].expand(-1, -1, dim)) + 0.3 * torch.randn(batch, tokens, dim, generator=g)

    return TokenBatch(
        features=clustered(width),
        saliency=torch.rand(batch, tokens, generator=g).softmax(dim=1),
        pre_features=clustered(pre_width),
        cls_pre_feature=torch.randn(batch, pre_width, generator=g),
        keys=torch.randn(batch, tokens + 1, 64, generator=g),
        instruction=torch.randn(batch, 1, width, generator=g),  # the profile's one-token instruction
    )


def _peak(batch: TokenBatch, method: str, keep: int, options: dict) -> int:
    with torch.inference_mode():
        return peak_bytes(lambda: reduce_tokens(method, batch, keep, METHODS[method].options(**options)), CPU)


@pytest.mark.parametrize("tower_inputs", [CLS_TOWER_INPUTS, QWEN_TOWER_INPUTS], ids=["clip", "qwen"])
@pytest.mark.parametrize(("tokens", "width", "pre_width"), [(96, 512, 128), (577, 256, 1024)])
def test_profile_covers_every_budget_and_option(tower_inputs: frozenset[str], tokens: int, width: int, pre_width: int) -> None:
    batch = _clustered_batch(2, tokens, width, pre_width, seed=tokens)
    accepted = [m for m, spec in METHODS.items() if set(spec.needs) <= tower_inputs]
    profile = memory_profile_settings(tokens, accepted)
    worst = max(_peak(batch, s.method, s.keep, s.options) for s in profile)
    assert worst >= tokens * tokens * 4 * 2  # at least one N x N float32 matrix per image
    for method in accepted:
        for keep in sorted({1, 2, tokens // 4, tokens // 2, tokens - 1}):
            for options in OPTION_VARIANTS.get(method, [{}]):
                unprofiled = PROFILE_INDEX_BYTES * len(batch.features) * max(0, keep - profile_keep(method, tokens))
                reads_instruction = "instruction" in METHODS[method].needs and not options  # lengths: default options
                for length in instruction_lengths(tokens) if reads_instruction else (1,):
                    instruction = torch.randn(len(batch.features), length, width)
                    # Beyond the profile: one copy of the instruction (its unit rows), as large as
                    # its embeddings, which are the prompt's own (not an N x N matrix).
                    copy = instruction.numel() * 4
                    peak = _peak(batch._replace(instruction=instruction), method, keep, options)
                    assert peak <= worst + unprofiled + copy, (method, keep, options, length, worst)
