"""CDPruner's batched selection against its per-step transcription (docs/methods.md, "CDPruner").

Random clustered cases (N 144..576, D 256..1024, M 4..32, K 8..128, both relevance signs,
a third with theta) must pick the identical index list, in pick order; crafted cases with
exact ties (copied tokens, equal relevance) check that ties land where `torch.argmax`
puts them (the lowest index), with the expected picks written by hand.
Run with ``-s`` to see the agreement count. One torch thread, as the other audits.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch

from vllm_promprune.methods import select_tokens
from vllm_promprune.testing.stepwise import cdpruner_stepwise

CASES = 210


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _case(seed: int) -> tuple[torch.Tensor, torch.Tensor, int, int, float | None, str]:
    rng = random.Random(seed)
    n, d, m = rng.randint(144, 576), rng.randint(256, 1024), rng.randint(4, 32)
    k, clusters, noise = rng.randint(8, 128), rng.randint(2, 40), rng.uniform(0.05, 0.6)
    sign = rng.choice([1, -1])
    theta = rng.choice([None, None, rng.uniform(0.05, 0.95)])
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    features = centres[torch.randint(clusters, (n,), generator=g)] + noise * torch.randn(n, d, generator=g)
    # Instruction tokens: some near a few clusters (relevant content), some unrelated.
    near = centres[torch.randint(clusters, (m,), generator=g)] + torch.randn(m, d, generator=g)
    instruction = torch.where(torch.rand(m, 1, generator=g) < 0.6, near, torch.randn(m, d, generator=g))
    label = f"seed={seed} N={n} D={d} M={m} K={k} clusters={clusters} noise={noise:.2f} sign={sign} theta={theta}"
    return features, instruction, k, sign, theta, label


def test_random_cases_agree_with_the_transcription() -> None:
    agree, thetas, signs = 0, 0, set()
    failures = []
    for seed in range(CASES):
        features, instruction, k, sign, theta, label = _case(seed)
        fast = select_tokens(
            "cdpruner", features, k, instruction=instruction, relevance_sign=sign, theta=theta, order="selection"
        ).tolist()
        slow = cdpruner_stepwise(features, instruction, k, sign, theta)
        if fast == slow:
            agree += 1
        else:
            failures.append(label)
        thetas += theta is not None
        signs.add(sign)
    print(f"cdpruner: {agree}/{CASES} random cases identical in pick order ({thetas} with theta)")
    assert signs == {1, -1} and thetas >= 30
    assert not failures, failures[:5]


def _both(features: torch.Tensor, instruction: torch.Tensor, keep: int, **options: object) -> list[int]:
    fast = select_tokens("cdpruner", features, keep, instruction=instruction, order="selection", **options).tolist()
    slow = cdpruner_stepwise(features, instruction, keep, **options)
    assert fast == slow
    return fast


def test_copied_tokens_with_constant_relevance_tie_to_the_lowest_index() -> None:
    # Every token has cosine 0.5 to the instruction: relevance is constant, so r = 1 and L = S
    # with an exact all-ones diagonal. Copies of a picked token drop to gain 0 exactly.
    basis = torch.eye(4)
    features = basis[[2, 0, 2, 1, 3, 0]]
    instruction = torch.ones(1, 4)
    # ties at 1: 0; then {1, 3, 4, 5} at 1: 1; then {3, 4} at 1: 3, 4; then {2, 5} at 0: 2
    assert _both(features, instruction, 5) == [0, 1, 3, 4, 2]  # K < N (K = N keeps all)


def test_equal_relevance_ties_to_the_lowest_index() -> None:
    # Tokens 1 and 2 have bit-equal relevance (cosine 1/sqrt(2) each); 0 and 3 have cosine 0.
    basis = torch.eye(5)
    features = basis[[2, 0, 1, 3, 4]]
    instruction = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]])
    assert _both(features, instruction, 4) == [1, 2, 0, 3]
    # With the sign flipped, 0, 3 and 4 are the relevant (bit-equal) ones.
    assert _both(features, instruction, 4, relevance_sign=-1) == [0, 3, 4, 1]


def test_copied_relevant_tokens_first_pick_is_the_lowest_copy() -> None:
    g = torch.Generator().manual_seed(7)
    features = torch.randn(40, 16, generator=g)
    features[[5, 17, 30]] = features[3].clone()  # four copies of the most relevant token
    instruction = features[3:4] * 2.0 + 0.01 * torch.randn(1, 16, generator=g)
    picks = _both(features, instruction, 12)
    assert picks[0] == 3
    assert not {5, 17, 30} & set(picks[:10])  # a copy's residual gain is (about) 0
