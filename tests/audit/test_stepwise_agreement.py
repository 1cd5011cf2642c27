"""The batched selection methods against the slow per-step transcriptions of docs/methods.md.

`vllm_promprune.testing.stepwise` is an independent transcription of the specification (one image,
a Python loop per greedy step). Here both run on the same tensors on the same machine:
seeded random clustered cases (N 144..576, D 512..4096, K 32..192, 2..40 clusters, noise
0.05..0.6, continuous softmax saliency) and crafted cases with exact ties (copied tokens,
equal saliency values, equal scores) at every ranking step. Their expected picks are written
by hand from the spec's tie rules where the rule is `argmax` (first index), and computed with
the call the spec's table names where it is a sort or topk (equal values land where that
call puts them); each such case also checks that a stable sort would pick differently, so
the tie really is decided there.

Run with ``-s`` to see the per-method agreement counts on success.

The module runs torch on ONE thread (restored afterwards): on this 2-core machine shared
with other jobs, two OpenMP threads made the small per-step kernels 10-100x slower
(spin-waiting on a busy core), 900 s instead of about 70 s for the file. Both sides of
every comparison run under the same setting, so agreement does not depend on it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache

import pytest
import torch

from vllm_promprune.methods import merge_tokens, select_tokens
from vllm_promprune.methods.common import cosine_matrix
from vllm_promprune.testing.stepwise import (
    cosine_gram_stepwise,
    coverage_stepwise,
    divprune_stepwise,
    entropy_stepwise,
    facility_location_stepwise,
    fps_stepwise,
    promprune_stepwise,
    prunesid_stepwise,
    saliency_count_stepwise,
    saliency_stepwise,
    visionzip_plan_stepwise,
    visionzip_stepwise,
    vispruner_stepwise,
)

CASES = 200  # random cases per method
PROMPRUNE_CASES = 240  # three regimes of the split, 80 each


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------- random cases


@dataclass(frozen=True)
class Case:
    """One random clustered image. Tensors are rebuilt from the seed on demand."""

    seed: int
    n: int  # patch tokens
    d: int  # projected width
    dv: int  # pre-projector width
    dk: int  # key width
    k: int  # budget
    clusters: int
    noise: float
    common: float  # weight of a direction shared by all tokens (sets the mean cosine)
    temperature: float  # scale of the saliency logits

    def _generator(self, role: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1009 + role)

    def _assignment(self) -> torch.Tensor:
        return torch.randint(self.clusters, (self.n + 1,), generator=self._generator(0))

    def _clustered(self, role: int, width: int) -> torch.Tensor:
        """[N + 1, width] rows: shared direction + cluster centre + noise (row 0 plays CLS)."""
        g = self._generator(role)
        centres = torch.randn(self.clusters, width, generator=g)
        shared = torch.randn(width, generator=g)
        noise = torch.randn(self.n + 1, width, generator=g)
        return self.common * shared + centres[self._assignment()] + self.noise * noise

    def features(self) -> torch.Tensor:
        """[N, D] projected patch tokens."""
        return self._clustered(1, self.d)[1:].contiguous()

    def tokens(self) -> torch.Tensor:
        """[N + 1, Dv] pre-projector tokens, CLS first."""
        return self._clustered(2, self.dv)

    def keys(self) -> torch.Tensor:
        """[N + 1, Dk] head-mean keys, CLS first."""
        return self._clustered(3, self.dk)

    def saliency(self) -> torch.Tensor:
        """[N] softmax of random logits: continuous, no equal values."""
        logits = torch.randn(self.n, generator=self._generator(4)) * self.temperature
        return torch.softmax(logits, dim=0)


def make_case(seed: int) -> Case:
    rng = random.Random(seed)
    n = rng.choice([144, 196, 256, 324, 400, 576, 576, rng.randint(144, 576)])
    d = rng.choices([512, 768, 1024, 1536, 2048, 4096], weights=[3, 3, 3, 1, 2, 1])[0]
    return Case(
        seed=seed,
        n=n,
        d=d,
        dv=rng.choice([512, 768, 1024]),
        dk=rng.choice([64, 128, 1024]),
        k=rng.randint(32, min(192, n - 1)),
        clusters=rng.randint(2, 40),
        noise=rng.uniform(0.05, 0.6),
        common=rng.uniform(0.0, 1.5),
        temperature=rng.uniform(0.5, 3.0),
    )


@cache
def case_list(count: int) -> tuple[Case, ...]:
    return tuple(make_case(seed) for seed in range(count))


@cache
def case_entropy(seed: int, entropy: str) -> float:
    """The stepwise entropy of a random case (cached: the split regimes need it twice)."""
    case = make_case(seed)
    return float(entropy_stepwise(case.features(), case.saliency(), entropy))  # type: ignore[arg-type]


def promprune_options(case: Case) -> dict[str, object]:
    """Options of a random PromPrune case: the split regime is `seed % 3`.

    0: mu = 0 (K_sal = 0 unless the entropy is tiny), 1: mu = 1 (K_sal ~ K),
    2: mu at the case's own entropy plus up to +-tau/2 (K_sal ~ K/2, not on a .5 boundary).
    About a quarter use the attention / feature_norm proxies, 40% FPS or FL coverage,
    10% the evaluation bounds (0.1, 0.7) and 10% a fixed share.
    """
    rng = random.Random(10**6 + case.seed)
    options: dict[str, object] = {
        "entropy": rng.choices(["spectral", "attention", "feature_norm"], weights=[70, 15, 15])[0],
        "coverage": rng.choices(["dpp", "fps", "fl"], weights=[60, 20, 20])[0],
    }
    extra = rng.random()
    if extra < 0.1:
        options.update(kr_min=0.1, kr_max=0.7)
    elif extra < 0.2:
        options["fixed_share"] = rng.choice([0.25, 0.5, 0.75, round(rng.random(), 3)])
    regime = case.seed % 3
    if regime == 0:
        options["mu"] = 0.0
    elif regime == 1:
        options["mu"] = 1.0
    else:
        own = case_entropy(case.seed, str(options["entropy"]))
        options["mu"] = min(1.0, max(0.0, own + rng.uniform(-0.5, 0.5) * 0.02))
    return options


# --------------------------------------------------------------------------- runners
# Each builds the case's tensors once and returns (fast, stepwise) as lists of ints in
# the method's selection order.


def _fast(method: str, features: torch.Tensor, keep: int, **kwargs: object) -> list[int]:
    return select_tokens(method, features, keep, order="selection", **kwargs).tolist()


def run_promprune(case: Case) -> tuple[list[int], list[int]]:
    features, saliency, options = case.features(), case.saliency(), promprune_options(case)
    fast = _fast("promprune", features, case.k, saliency=saliency, **options)
    return fast, promprune_stepwise(features, saliency, case.k, **options)  # type: ignore[arg-type]


def run_prunesid(case: Case) -> tuple[list[int], list[int]]:
    tokens, saliency = case.tokens(), case.saliency()
    fast = _fast("prunesid", tokens[1:], case.k, saliency=saliency, pre_features=tokens[1:], cls_pre_feature=tokens[0])
    return fast, prunesid_stepwise(tokens, saliency, case.k)


def run_divprune(case: Case) -> tuple[list[int], list[int]]:
    features = case.features()
    return _fast("divprune", features, case.k), divprune_stepwise(features, case.k)


def run_vispruner(case: Case) -> tuple[list[int], list[int]]:
    patches, saliency = case.tokens()[1:], case.saliency()
    fast = _fast("vispruner", case.features(), case.k, saliency=saliency, pre_features=patches)
    return fast, vispruner_stepwise(patches, saliency, case.k)


def run_fps(case: Case) -> tuple[list[int], list[int]]:
    features = case.features()
    return _fast("fps", features, case.k), fps_stepwise(features, case.k)


def run_facility_location(case: Case) -> tuple[list[int], list[int]]:
    features = case.features()
    return _fast("facility_location", features, case.k), facility_location_stepwise(features, case.k)


def run_coverage(case: Case) -> tuple[list[int], list[int]]:
    features = case.features()
    return _fast("coverage", features, case.k), coverage_stepwise(features, case.k)


def run_saliency(case: Case) -> tuple[list[int], list[int]]:
    saliency = case.saliency()
    return _fast("saliency", torch.zeros(case.n, 1), case.k, saliency=saliency), saliency_stepwise(saliency, case.k)


# method -> (runner, number of cases, compare pick order (True) or index sets (False))
RUNNERS: dict[str, tuple[Callable[[Case], tuple[list[int], list[int]]], int, bool]] = {
    "promprune": (run_promprune, PROMPRUNE_CASES, True),
    "prunesid": (run_prunesid, CASES, True),
    "divprune": (run_divprune, CASES, True),
    "vispruner": (run_vispruner, CASES, False),
    "fps": (run_fps, CASES, True),
    "facility_location": (run_facility_location, CASES, True),
    "coverage": (run_coverage, CASES, True),
    "saliency": (run_saliency, CASES, True),
}


def _describe(case: Case) -> str:
    return (
        f"seed={case.seed} N={case.n} D={case.d} Dv={case.dv} K={case.k} "
        f"clusters={case.clusters} noise={case.noise:.2f}"
    )


def _first_difference(fast: list[int], slow: list[int]) -> str:
    for step, (a, b) in enumerate(zip(fast, slow)):
        if a != b:
            return f"step {step}: fast {a} vs stepwise {b}"
    return f"lengths {len(fast)} vs {len(slow)}"


def test_cosine_matrix_is_the_plain_product() -> None:
    """The batched code's cosine_matrix (row blocks above 512 rows) equals the stepwise
    code's single ``Y @ Y.T`` bit for bit on the shapes of the random cases, so the two
    sides compare the same similarity values."""
    shapes = sorted({(case.n, case.d) for case in case_list(PROMPRUNE_CASES)})
    widths = sorted({case.dv for case in case_list(CASES)} | {case.dk for case in case_list(CASES)})
    shapes += [(576, width) for width in widths] + [(577, width) for width in widths]
    g = torch.Generator().manual_seed(0)
    differing = []
    for rows, width in shapes:
        x = torch.randn(rows, width, generator=g)
        if not torch.equal(cosine_matrix(x[None], 1e-6)[0], cosine_gram_stepwise(x, 1e-6)):
            differing.append((rows, width))
    assert not differing, f"cosine_matrix != Y @ Y.T for {len(differing)}/{len(shapes)} shapes: {differing[:10]}"


@pytest.mark.parametrize("method", list(RUNNERS))
def test_random_cases_agree(method: str) -> None:
    runner, count, ordered = RUNNERS[method]
    agree_set = agree_order = 0
    failures: list[str] = []
    for case in case_list(count):
        try:
            fast, slow = runner(case)
        except Exception as error:  # noqa: BLE001 - a crash counts as a disagreement; the loop goes on
            if len(failures) < 5:
                failures.append(f"{_describe(case)}: raised {error!r}")
            continue
        same_set = sorted(fast) == sorted(slow)
        same_order = fast == slow
        agree_set += same_set
        agree_order += same_order
        if not (same_order if ordered else same_set) and len(failures) < 5:
            failures.append(f"{_describe(case)}: {_first_difference(fast, slow)}")
    agree = agree_order if ordered else agree_set
    summary = (
        f"{method}: {agree}/{count} agree ({'pick order' if ordered else 'index set'}); "
        f"sets {agree_set}/{count}, orders {agree_order}/{count}"
    )
    print(summary)
    assert agree == count, summary + "; first disagreements: " + " | ".join(failures)


def test_promprune_regimes_are_mixed() -> None:
    """The random PromPrune cases cover K_sal = 0, K_sal = K and split budgets."""
    zero = full = mixed = 0
    for case in case_list(PROMPRUNE_CASES):
        options = promprune_options(case)
        value = torch.tensor(case_entropy(case.seed, str(options["entropy"])))
        split = {key: options[key] for key in ("mu", "kr_min", "kr_max", "fixed_share") if key in options}
        count = saliency_count_stepwise(value, case.k, **split)  # type: ignore[arg-type]
        zero += count == 0
        full += count == case.k
        mixed += 0 < count < case.k
    print(f"promprune split: K_sal=0 {zero}, K_sal=K {full}, mixed {mixed}")
    assert min(zero, full, mixed) >= PROMPRUNE_CASES // 5, (zero, full, mixed)


def test_visionzip_random_cases_agree() -> None:
    exact = close = 0
    failures: list[str] = []
    for case in case_list(CASES):
        tokens, keys, saliency = case.tokens(), case.keys(), case.saliency()
        slow = visionzip_stepwise(tokens, keys, saliency, case.k)
        try:
            fast = merge_tokens(
                "visionzip", tokens[1:], case.k, cls_pre_feature=tokens[0], keys=keys, saliency=saliency
            )
        except Exception as error:  # noqa: BLE001 - a crash counts as a disagreement; the loop goes on
            if len(failures) < 5:
                failures.append(f"{_describe(case)}: raised {error!r}")
            continue
        exact += torch.equal(fast, slow)
        ok = fast.shape == slow.shape and torch.allclose(fast, slow, rtol=1e-6, atol=1e-6)
        close += ok
        if not ok and len(failures) < 5:
            rows = "shape" if fast.shape != slow.shape else (fast != slow).any(dim=1).nonzero().flatten()[:5].tolist()
            failures.append(f"{_describe(case)}: rows {rows}")
    summary = f"visionzip: {close}/{CASES} agree (allclose 1e-6); bit-identical {exact}/{CASES}"
    print(summary)
    assert close == CASES, summary + "; first disagreements: " + " | ".join(failures)


# --------------------------------------------------------------------------- crafted ties

# 24 tokens on scaled basis directions of R^32: cosines are exactly 0 or 1, so every
# greedy score below is an exact tie or an exact gap. Direction of each row:
# 0 is copied by row 6, 1 by row 3, 3 by rows 9 and 12; the others are unique.
DIRECTIONS = [0, 1, 2, 1, 3, 4, 0, 5, 6, 3, 7, 8, 3, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]


def basis_tokens(width: int = 32) -> torch.Tensor:
    rows = torch.zeros(len(DIRECTIONS), width)
    for row, direction in enumerate(DIRECTIONS):
        rows[row, direction] = 1.0 + 0.25 * row  # unit rows are exactly the basis vectors
    return rows


def tied_saliency() -> torch.Tensor:
    """Rows 3, 5, 10, 17, 20 share the top value; the rest share a lower one."""
    saliency = torch.full((len(DIRECTIONS),), 0.01)
    saliency[[3, 5, 10, 17, 20]] = 0.3
    return saliency


def _both(method: str, features: torch.Tensor, keep: int, **kwargs: object) -> list[int]:
    return select_tokens(method, features, keep, order="selection", **kwargs).tolist()


# Expected picks, by hand from the tie rules (argmax / argmin: first index; structural
# first DPP pick: lowest index):
# - DPP / FPS over all: 0 first, then the lowest row of each direction not yet covered
#   (copies have DPP gain 0 and FPS distance 0): 0, 1, 2, 4, 5, 7.
# - DivPrune: rows with a copy have nearest-neighbour distance 0, so the first pick is
#   row 2 (first unique direction); then the lowest uncovered rows: 0, 1, 4, 5, 7.
# - Facility location: gain = rows on the same direction: 3 for direction 3 (row 4
#   first), 2 for directions 0 and 1 (rows 0, 1), then 1 (rows 2, 5).
@pytest.mark.parametrize(
    ("method", "stepwise", "keep", "expected"),
    [
        ("coverage", coverage_stepwise, 6, [0, 1, 2, 4, 5, 7]),
        ("fps", fps_stepwise, 6, [0, 1, 2, 4, 5, 7]),
        ("divprune", divprune_stepwise, 6, [2, 0, 1, 4, 5, 7]),
        ("facility_location", facility_location_stepwise, 5, [4, 0, 1, 2, 5]),
    ],
)
def test_copied_tokens_tie_to_first_index(method: str, stepwise: Callable, keep: int, expected: list[int]) -> None:
    features = basis_tokens()
    assert stepwise(features, keep) == expected
    assert _both(method, features, keep) == expected


def top_four_saliency() -> torch.Tensor:
    """Rows 3, 5, 10, 17 share the top value (exactly four: no tie at a K_sal = 4 boundary)."""
    saliency = torch.full((len(DIRECTIONS),), 0.01)
    saliency[[3, 5, 10, 17]] = 0.3
    return saliency


def _stable_top(scores: torch.Tensor, count: int) -> list[int]:
    """What a stable descending sort would rank first (equal values: lower index first)."""
    return torch.sort(scores.float(), descending=True, stable=True).indices[:count].tolist()


# PromPrune with fixed_share 0.5, K = 8: stage 1 = rows 3, 5, 10, 17 (the four equal top
# values, in the order topk returns them). Stage 1 covers directions 1, 4, 7, 13.
# - DPP: every remaining row's max cosine to stage 1 is 0 except row 1 (1), so the first
#   pick is row 0; the DPP kernel is over the remaining rows only, so row 1 (a copy of
#   stage-1 row 3's direction) still has gain 1: 0, 1, 2, 4.
# - FPS: starts from stage 1: row 1 is at distance 0, so 0, 2, 4, 7.
# - FL: cover 1 on directions 1, 4, 7, 13: direction 3 (gain 3, row 4), direction 0
#   (gain 2, row 0), then the first uncovered singles: 2, 7.
@pytest.mark.parametrize(
    ("coverage", "expected"),
    [("dpp", [3, 5, 10, 17, 0, 1, 2, 4]), ("fps", [3, 5, 10, 17, 0, 2, 4, 7]), ("fl", [3, 5, 10, 17, 4, 0, 2, 7])],
)
def test_promprune_ties_on_crafted_tokens(coverage: str, expected: list[int]) -> None:
    features, saliency = basis_tokens(), top_four_saliency()
    options = {"fixed_share": 0.5, "coverage": coverage}
    for picks in (
        promprune_stepwise(features, saliency, 8, **options),  # type: ignore[arg-type]
        _both("promprune", features, 8, saliency=saliency, **options),
    ):
        assert picks[:4] == torch.topk(saliency, 4, largest=True, sorted=False).indices.tolist()
        assert sorted(picks[:4]) == expected[:4] and picks[4:] == expected[4:]


def test_promprune_stage_one_ties_go_where_topk_puts_them() -> None:
    """Five equal top saliencies, K_sal = 4: stage 1 is the reference's topk call on them."""
    features, saliency = basis_tokens(), tied_saliency()
    expected = torch.topk(saliency, 4, dim=-1, largest=True, sorted=False).indices.tolist()
    assert set(expected) != set(_stable_top(saliency, 4))  # the tie decides a token here
    assert promprune_stepwise(features, saliency, 8, fixed_share=0.5)[:4] == expected
    assert promprune_stepwise(features, saliency, 8, fixed_share=0.5, ranking="stable")[:4] == _stable_top(saliency, 4)
    fast = _both("promprune", features, 8, saliency=saliency, fixed_share=0.5)
    assert fast[:4] == expected
    assert fast == promprune_stepwise(features, saliency, 8, fixed_share=0.5)


def test_saliency_control_ties_lower_index_first() -> None:
    features, saliency = basis_tokens(), tied_saliency()
    expected = [3, 5, 10, 17, 20, 0, 1]
    assert saliency_stepwise(saliency, 7) == expected
    assert _both("saliency", features, 7, saliency=saliency) == expected


def _diagonal_argmax_not_first() -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous random tokens whose computed kernel diagonal does NOT peak at row 0."""
    g = torch.Generator().manual_seed(7)
    features = torch.randn(64, 300, generator=g)
    saliency = torch.softmax(torch.randn(64, generator=g), dim=0)
    diagonal = torch.diagonal(cosine_gram_stepwise(features, 1e-6))
    assert int(torch.argmax(diagonal)) != 0  # float rounding alone would not pick row 0
    return features, saliency


def test_empty_stage1_first_dpp_pick_is_lowest_index() -> None:
    """Structural tie: with K_sal = 0 the first DPP pick is row 0, whatever rounding says."""
    features, saliency = _diagonal_argmax_not_first()
    value = entropy_stepwise(features, saliency)
    assert saliency_count_stepwise(value, 16, mu=0.0) == 0
    slow = promprune_stepwise(features, saliency, 16, mu=0.0)
    assert slow[0] == 0
    assert _both("promprune", features, 16, saliency=saliency, mu=0.0) == slow
    assert coverage_stepwise(features, 16)[0] == 0
    assert _both("coverage", features, 16) == coverage_stepwise(features, 16)


def _vispruner_positional(pre_features: torch.Tensor, saliency: torch.Tensor, keep: int) -> list[int]:
    """The bug the spec names: the residual list kept in positional order.

    Built from the transcription by giving the residual tokens saliencies that fall with
    position (all below the important tokens'), so the same important tokens are kept but
    the residual list starts in ascending position.
    """
    important = vispruner_stepwise(pre_features, saliency, keep)[: int(keep * 0.5)]
    positional = torch.linspace(0.5, 0.1, saliency.shape[0])
    positional[important] = 1.0 + saliency[important]
    return vispruner_stepwise(pre_features, positional, keep)


def test_vispruner_residual_is_in_saliency_order() -> None:
    g = torch.Generator().manual_seed(3)
    assignment = torch.randint(6, (48,), generator=g)
    pre_features = torch.randn(6, 32, generator=g)[assignment] + 0.4 * torch.randn(48, 32, generator=g)
    saliency = torch.softmax(torch.randn(48, generator=g), dim=0)
    slow = vispruner_stepwise(pre_features, saliency, 12)
    positional = _vispruner_positional(pre_features, saliency, 12)
    assert slow[:6] == positional[:6]  # same important tokens
    assert sorted(slow) != sorted(positional)  # the list order changes the picks here
    fast = _both("vispruner", pre_features, 12, saliency=saliency, pre_features=pre_features)
    assert sorted(fast) == sorted(slow)


def test_vispruner_saliency_ties_go_where_argsort_puts_them() -> None:
    """Five equal top saliencies, K_imp = 4, copied pre-projector tokens (scores 0 or 1)."""
    features, saliency = basis_tokens(), tied_saliency()
    order = saliency[None].argsort(dim=-1, descending=True)[0].tolist()
    assert set(order[:4]) != set(_stable_top(saliency, 4))  # the tie decides a token here
    slow = vispruner_stepwise(features, saliency, 8)
    assert slow[:4] == order[:4]
    assert set(vispruner_stepwise(features, saliency, 8, ranking="stable")[:4]) == set(_stable_top(saliency, 4))
    fast = _both("vispruner", features, 8, saliency=saliency, pre_features=features)
    assert fast[:4] == order[:4] and sorted(fast) == sorted(slow)


def test_vispruner_equal_scores_drop_where_argsort_puts_them() -> None:
    """18 evens that all score exactly 1 (each is a copy of its odd neighbour): one round.

    N = 64, K = 56: K_imp = 28 (rows 0-27, strictly decreasing saliency), K_div = 28,
    residual rows 28-63 in that order (R = 36), r = min(8, 36 - 28) = 8. Evens: rows 28,
    30, ..., 62, each on the basis direction of the odd row after it, so every score is
    exactly 1.0. The reference drops the evens in the first 8 slots of
    ``scores.argsort(dim=-1, descending=True)``; the rest survive; R = 10 + 18 = 28 = K_div.
    A stable sort would drop rows 28-42 instead.
    """
    n, keep = 64, 56
    features = torch.zeros(n, 64)
    for row in range(n):
        direction = row if row < 28 else 28 + (row - 28) // 2
        features[row, direction] = 1.0 + 0.1 * row
    saliency = torch.linspace(1.0, 0.1, n)
    evens, odds = list(range(28, 64, 2)), list(range(29, 64, 2))
    unit = torch.nn.functional.normalize(features, dim=-1)
    scores = (unit[evens] @ unit[odds].T).amax(dim=1)
    assert torch.equal(scores, torch.ones(len(evens)))  # exact ties
    dropped = {evens[slot] for slot in scores[None].argsort(dim=-1, descending=True)[0, :8].tolist()}
    assert dropped != set(range(28, 43, 2))  # not what a stable sort drops
    expected = set(range(n)) - dropped
    slow = vispruner_stepwise(features, saliency, keep)
    assert set(slow) == expected and len(slow) == keep
    assert set(vispruner_stepwise(features, saliency, keep, ranking="stable")) == set(range(n)) - set(range(28, 43, 2))
    fast = _both("vispruner", features, keep, saliency=saliency, pre_features=features)
    assert set(fast) == expected, f"fast keeps {sorted(set(fast) - expected)} instead of {sorted(expected - set(fast))}"


def test_visionzip_targets_when_r_is_not_a_multiple() -> None:
    """N = 20, K = 7, dominant_ratio 3/7: K_dom = 3 (CLS + patches 5, 11 = rows 6, 12), K_ctx = 4.

    Remaining rows: 1-5, 7-11, 13-20 (R = 18, not a multiple of 4). step = 18 // 4 = 4, so
    the targets are list positions 0, 4, 8, 12 = rows 1, 5, 10, 15 (floor(i * R / K_ctx)
    would give positions 0, 4, 9, 13 = rows 1, 5, 11, 16). Keys put every other remaining
    row next to one target by hand; target 15 gets nothing.
    """
    n, keep = 20, 7
    g = torch.Generator().manual_seed(11)
    tokens = torch.randn(n + 1, 16, generator=g)
    saliency = torch.full((n,), 0.01)
    saliency[5], saliency[11] = 0.5, 0.4
    targets = [1, 5, 10, 15]
    assignment = {
        2: 10, 3: 10, 4: 1, 7: 5, 8: 5, 9: 1, 11: 10, 13: 5, 14: 1, 16: 1, 17: 10, 18: 5, 19: 10, 20: 1,
    }
    keys = torch.randn(n + 1, 8, generator=g)  # dominant rows: anything
    for column, target in enumerate(targets):
        keys[target] = torch.nn.functional.one_hot(torch.tensor(column), 8).float()
    for row, target in assignment.items():
        keys[row] = keys[target] + 0.05 * torch.randn(8, generator=g)
    dominant, plan_targets, plan_assignment = visionzip_plan_stepwise(keys, saliency, keep, 3 / 7)
    assert dominant == [0, 6, 12]
    assert plan_targets == targets
    assert plan_assignment == assignment
    expected = [tokens[0], tokens[6], tokens[12]]
    for target in targets:
        joined = [row for row, chosen in assignment.items() if chosen == target]
        expected.append(tokens[target] + tokens[joined].mean(dim=0) if joined else tokens[target])
    expected_tensor = torch.stack(expected)
    slow = visionzip_stepwise(tokens, keys, saliency, keep, 3 / 7)
    fast = merge_tokens(
        "visionzip", tokens[1:], keep, cls_pre_feature=tokens[0], keys=keys, saliency=saliency, dominant_ratio=3 / 7
    )
    torch.testing.assert_close(slow, expected_tensor, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast, expected_tensor, rtol=1e-6, atol=1e-6)


def _prunesid_copies() -> tuple[torch.Tensor, torch.Tensor]:
    """41 random rows (CLS + 40 patches), then patches 40..63 copying patches 0..23.

    Patches 0..19 and their copies 40..59 share one attention value (44 equal values), so
    an original and its copy (same features: same group, cosine 1 > thr) are tied.
    """
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1 + 40, 48, generator=g)
    tokens = torch.cat([base, base[1:25]])
    saliency = torch.cat([torch.full((20,), 0.02), torch.rand(20, generator=g) * 0.01, torch.full((24,), 0.02)])
    return tokens, saliency


def test_prunesid_in_group_ties_go_where_argsort_puts_them() -> None:
    """Of a tied original and copy, NMS picks the one ``argsort(dim=1, descending=True)`` of
    the attention row puts first and suppresses the other (ranked after every pick), so a
    kept later one implies a kept earlier one; a stable sort (lower index first) picks
    other tokens here."""
    tokens, saliency = _prunesid_copies()
    position = saliency[None].argsort(dim=1, descending=True)[0].argsort().tolist()  # place in that order
    slow = prunesid_stepwise(tokens, saliency, 24)
    kept = {row - 1 for row in slow[1:]}
    decided = 0
    for patch in range(20):
        first, second = sorted((patch, patch + 40), key=lambda p: position[p])
        decided += first > second  # argsort puts the copy first: a stable sort would not
        if second in kept:
            assert first in kept
    assert decided > 0
    assert slow != prunesid_stepwise(tokens, saliency, 24, ranking="stable")  # the ties decide tokens
    features = torch.randn(64, 32, generator=torch.Generator().manual_seed(6))
    fast = _both("prunesid", features, 24, saliency=saliency, pre_features=tokens[1:], cls_pre_feature=tokens[0])
    assert fast == slow


def test_visionzip_dominant_ties_go_where_topk_puts_them() -> None:
    """Five equal top saliencies, K_dom - 1 = 4 dominant patches: the set topk(4, dim=1) returns."""
    g = torch.Generator().manual_seed(12)
    tokens, keys = torch.randn(25, 16, generator=g), torch.randn(25, 8, generator=g)
    saliency = tied_saliency()
    top = torch.topk(saliency[None], 4, dim=1).indices[0].tolist()
    assert set(top) != set(_stable_top(saliency, 4))  # the tie decides a token here
    dominant, _, _ = visionzip_plan_stepwise(keys, saliency, 6, 5 / 6)  # K_dom = 5, K_ctx = 1
    assert dominant == [0, *sorted(patch + 1 for patch in top)]
    stable_dominant, _, _ = visionzip_plan_stepwise(keys, saliency, 6, 5 / 6, ranking="stable")
    assert stable_dominant == [0, *sorted(patch + 1 for patch in _stable_top(saliency, 4))]
    fast = merge_tokens("visionzip", tokens[1:], 6, cls_pre_feature=tokens[0], keys=keys, saliency=saliency,
                        dominant_ratio=5 / 6)
    torch.testing.assert_close(fast, visionzip_stepwise(tokens, keys, saliency, 6, 5 / 6), rtol=1e-6, atol=1e-6)
    assert torch.equal(fast[:5], tokens[dominant])
