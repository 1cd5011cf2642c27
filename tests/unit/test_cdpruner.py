"""CDPruner (library method): options, batching, dtype, the instruction's effect, the sign check."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from vllm_promprune.methods import METHODS, CDPrunerOptions, TokenBatch, parse_options, reduce_tokens, select_tokens
from vllm_promprune.methods.cdpruner import cdpruner_select
from vllm_promprune.pruning import CLS_TOWER_INPUTS
from vllm_promprune.settings import PruneSettings


def _clustered(images: int, n: int, d: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(images, 6, d, generator=g)
    features = centres.gather(1, torch.randint(6, (images, n, 1), generator=g).expand(-1, -1, d))
    features = features + 0.4 * torch.randn(images, n, d, generator=g)
    instruction = centres[:, :2].repeat(1, m // 2, 1) + torch.randn(images, m, d, generator=g)
    return features, instruction


def test_options_defaults_and_validation() -> None:
    assert CDPrunerOptions() == CDPrunerOptions(relevance_sign=1, theta=None)
    assert parse_options("cdpruner", {"relevance_sign": -1, "theta": 0.5}).theta == 0.5
    for bad, field in (
        ({"relevance_sign": 0}, "relevance_sign"),
        ({"relevance_sign": 2}, "relevance_sign"),
        ({"theta": 0.0}, "theta"),
        ({"theta": 1.0}, "theta"),
        ({"theta": float("nan")}, "theta"),
        ({"mu": 0.5}, "mu: unknown option"),
    ):
        with pytest.raises(ValueError, match=field):
            parse_options("cdpruner", bad)
    with pytest.raises(ValidationError, match="frozen"):
        CDPrunerOptions().theta = 0.5


def test_inputs_are_checked() -> None:
    features, instruction = _clustered(1, 30, 8, 4, 0)
    with pytest.raises(ValueError, match="needs instruction"):
        select_tokens("cdpruner", features[0], 5)
    with pytest.raises(ValueError, match=r"\[M, D\]"):
        select_tokens("cdpruner", features[0], 5, instruction=instruction)
    with pytest.raises(ValueError, match="instruction must have shape"):
        cdpruner_select(features, instruction[:, :, :4], 5)


def test_batched_equals_per_image() -> None:
    features, instruction = _clustered(4, 150, 48, 10, 1)
    for options in (CDPrunerOptions(), CDPrunerOptions(relevance_sign=-1, theta=0.6)):
        batched = cdpruner_select(features, instruction, 40, options)
        alone = torch.cat([cdpruner_select(f[None], t[None], 40, options) for f, t in zip(features, instruction)])
        assert torch.equal(batched, alone)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_equal_float32_of_the_rounded_values(dtype: torch.dtype) -> None:
    features, instruction = (t.to(dtype) for t in _clustered(3, 120, 40, 8, 2))
    for options in (CDPrunerOptions(), CDPrunerOptions(theta=0.3)):
        low = cdpruner_select(features, instruction, 30, options)
        assert torch.equal(low, cdpruner_select(features.float(), instruction.float(), 30, options))


def test_the_instruction_decides_the_picks() -> None:
    # Two clusters of 20 near-copies; K=10 from a relevance that favours one cluster.
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 32, generator=g)
    features = torch.cat([a + 0.05 * torch.randn(20, 32, generator=g), b + 0.05 * torch.randn(20, 32, generator=g)])
    towards_a = select_tokens("cdpruner", features, 1, instruction=a[None].repeat(3, 1))
    towards_b = select_tokens("cdpruner", features, 1, instruction=b[None].repeat(3, 1))
    assert int(towards_a) < 20 <= int(towards_b)
    picks_a = select_tokens("cdpruner", features, 10, instruction=a[None])
    picks_b = select_tokens("cdpruner", features, 10, instruction=b[None])
    assert not torch.equal(picks_a, picks_b)


def test_negated_instruction_with_sign_one_equals_sign_minus_one() -> None:
    """methods.md's fidelity check: T -> -T with sign 1 is the official code's (-rel) with T."""
    features, instruction = _clustered(2, 200, 64, 12, 4)
    for theta in (None, 0.4):
        flipped = cdpruner_select(features, -instruction, 50, CDPrunerOptions(theta=theta))
        signed = cdpruner_select(features, instruction, 50, CDPrunerOptions(relevance_sign=-1, theta=theta))
        plain = cdpruner_select(features, instruction, 50, CDPrunerOptions(theta=theta))
        assert torch.equal(flipped, signed) and not torch.equal(signed, plain)


def test_zero_rows_and_constant_relevance_stay_finite() -> None:
    features, instruction = _clustered(1, 60, 16, 4, 5)
    features[0, 7] = 0.0
    instruction[0, 1] = 0.0
    picks = cdpruner_select(features, instruction, 59)[0].tolist()
    assert len(set(picks)) == 59  # K far past the rank (D = 16): the guards keep picks distinct
    assert 7 not in cdpruner_select(features, instruction, 12)[0].tolist()  # gain 0 while rank remains
    constant = cdpruner_select(torch.eye(6)[None], torch.ones(1, 1, 6), 6)  # every cosine equal
    assert constant[0].tolist() == [0, 1, 2, 3, 4, 5]


def test_a_tower_without_instructions_refuses_cdpruner() -> None:
    assert "instruction" in METHODS["cdpruner"].needs
    PruneSettings(keep=8, method="cdpruner").check_inputs(CLS_TOWER_INPUTS, "the tower")  # the engine's towers
    with pytest.raises(ValueError, match=r"needs \['instruction'\], which the tower does not provide"):
        PruneSettings(keep=8, method="cdpruner").check_inputs(CLS_TOWER_INPUTS - {"instruction"}, "the tower")


def test_reduce_tokens_spatial_order() -> None:
    features, instruction = _clustered(2, 80, 24, 6, 6)
    batch = TokenBatch(features=features, instruction=instruction)
    spatial = reduce_tokens("cdpruner", batch, 20, CDPrunerOptions())
    picked = reduce_tokens("cdpruner", batch, 20, CDPrunerOptions(), order="selection")
    assert torch.equal(spatial, picked.sort(dim=1).values)


def test_min_max_per_image_smallest_case() -> None:
    # docs/methods.md's smallest case: scaled over the batch [A, B], image A would keep 2 then 0.
    image_a = torch.tensor([[0.0, -1.0], [-2.0, 1.0], [3.0, 1.0]]), torch.tensor([[3.0, 2.0]])
    image_b = torch.tensor([[1.0, -2.0], [-2.0, 1.0], [0.0, 3.0]]), torch.tensor([[1.0, -1.0]])
    batch = cdpruner_select(torch.stack([image_a[0], image_b[0]]), torch.stack([image_a[1], image_b[1]]), 2)
    alone = cdpruner_select(image_a[0][None], image_a[1][None], 2)
    assert batch[0].tolist() == alone[0].tolist() == [2, 1]


def test_relevance_sign_smallest_case() -> None:
    features, instruction = torch.eye(2)[None], torch.tensor([[[1.0, 0.0]]])
    assert cdpruner_select(features, instruction, 1).tolist() == [[0]]
    assert cdpruner_select(features, instruction, 1, CDPrunerOptions(relevance_sign=-1)).tolist() == [[1]]
    assert cdpruner_select(features, torch.ones(1, 1, 2), 1).tolist() == [[0]]  # constant relevance
