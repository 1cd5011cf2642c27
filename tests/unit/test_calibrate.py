"""`vllm-promprune calibrate`'s arithmetic: mu is the median, K_sal follows the split."""

from __future__ import annotations

import pytest

from vllm_promprune.tools.calibrate import calibrate, distribution


def _rows(entropies: list[float], tokens: int = 576) -> list[dict[str, object]]:
    return [
        {"image": f"{i}.png", "tokens": tokens, "phi": 1.0 - e / 2, "spectral_entropy": e, "attention_entropy": 0.5,
         "feature_norm_entropy": 0.9}
        for i, e in enumerate(entropies)
    ]


def test_mu_is_the_median_and_k_sal_follows_the_split() -> None:
    report = calibrate(_rows([0.9, 0.2, 0.5]), keep=64, tau=0.02)
    assert report["recommended_mu"] == 0.5
    assert report["recommended_phi_ref"] == 0.75 and report["distributions"]["phi"]["max"] == 0.9
    # Far above mu: every token to coverage; far below: every token to saliency; at mu: half.
    assert [row["k_sal"] for row in report["per_image"]] == [0, 64, 32]
    assert report["distributions"]["spectral_entropy"]["median"] == 0.5
    assert report["k_sal"]["max"] == 64 and report["images"] == 3


def test_k_sal_is_capped_by_the_image_tokens() -> None:
    report = calibrate(_rows([0.05, 0.5, 0.9], tokens=20), keep=64, tau=0.02)  # the split of min(keep, N) = 20
    assert [row["k_sal"] for row in report["per_image"]] == [20, 10, 0]


def test_distribution_quantiles() -> None:
    values = [float(v) for v in range(1, 22)]  # 1..21
    summary = distribution(values)
    assert (summary["min"], summary["median"], summary["max"], summary["mean"]) == (1.0, 11.0, 21.0, 11.0)
    assert (summary["p10"], summary["p25"], summary["p75"], summary["p90"]) == (3.0, 6.0, 16.0, 19.0)
    assert distribution([0.7]) == pytest.approx(dict.fromkeys(summary, 0.7))
