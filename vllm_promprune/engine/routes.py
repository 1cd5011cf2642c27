"""The two request routes for pruning settings, reduced to one (no vLLM import).

Settings may arrive in `mm_processor_kwargs={"promprune": {...}}` or, as the
sampling parameters, in OpenAI `vllm_xargs` with flat `promprune_<key>` keys
(offline: `SamplingParams(extra_args={"promprune": {...}})`). Only
`mm_processor_kwargs` reaches vLLM's multimodal processor and its hash, so both
routes are folded into it, key-sorted so that equal settings hash equally
whichever route carried them. Different values for one key in two routes are
an error.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..settings import SETTINGS_KEY

XARGS_PREFIX = f"{SETTINGS_KEY}_"


def settings_from_xargs(xargs: Mapping[str, object] | None) -> dict[str, object] | None:
    """`{"promprune_keep": 64}` -> `{"keep": 64}`; None if there are no such keys."""
    if not xargs:
        return None
    found = {key[len(XARGS_PREFIX):]: value for key, value in xargs.items() if key.startswith(XARGS_PREFIX)}
    return found or None


def without_settings_keys(xargs: Mapping[str, object]) -> dict[str, object]:
    return {key: value for key, value in xargs.items() if not key.startswith(XARGS_PREFIX)}


def combine_routes(
    from_mm_kwargs: object,
    from_sampling: Mapping[str, object] | None,
    sampling_field: str,
) -> dict[str, object] | None:
    """One settings dict from both routes, keys sorted; None if neither has any.

    `sampling_field` names the second route in error messages, e.g.
    "vllm_xargs.promprune_" or "extra_args.promprune.".
    """
    if from_mm_kwargs is not None and not isinstance(from_mm_kwargs, Mapping):
        raise ValueError(
            f"mm_processor_kwargs.{SETTINGS_KEY} must be an object, got {type(from_mm_kwargs).__name__}"
        )
    if from_mm_kwargs is None and from_sampling is None:
        return None
    first, second = dict(from_mm_kwargs or {}), dict(from_sampling or {})
    conflicts = sorted(key for key in first.keys() & second.keys() if first[key] != second[key])
    if conflicts:
        key = conflicts[0]
        raise ValueError(
            f"conflicting pruning settings: mm_processor_kwargs.{SETTINGS_KEY}.{key}={first[key]!r} "
            f"but {sampling_field}{key}={second[key]!r}; send each setting once"
        )
    return dict(sorted({**second, **first}.items()))
