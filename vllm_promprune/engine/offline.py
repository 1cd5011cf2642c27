"""Offline use: `PromPruneLLM`, an `LLM` that also takes settings from sampling parameters.

`SamplingParams(extra_args={"promprune": {...}})` does not reach vLLM's
multimodal processor or its hash by itself; `PromPruneLLM.generate` folds it
into each prompt's `mm_processor_kwargs` (the same fold the server's
middleware does for `vllm_xargs`), so both routes have exactly the same effect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vllm import LLM, SamplingParams
from vllm.outputs import RequestOutput

from ..settings import SETTINGS_KEY
from . import planning
from .plugin import NO_VIDEO_PRUNING, hf_overrides, stock_architecture, video_pruning_refused
from .routes import combine_routes


class PromPruneLLM(LLM):
    """`vllm.LLM` serving the pruned variant of `model`'s architecture.

    Args:
        model: checkpoint directory or hub id of a supported stock architecture.
        default_settings: settings every request's settings are merged over.
        **kwargs: passed to `vllm.LLM` (an explicit `hf_overrides` wins).
    """

    def __init__(self, model: str, *, default_settings: Mapping[str, object] | None = None, **kwargs: Any) -> None:
        architecture = stock_architecture(model)
        if kwargs.get("video_pruning_rate") and architecture in NO_VIDEO_PRUNING:
            raise video_pruning_refused(NO_VIDEO_PRUNING[architecture])  # before the engine starts
        kwargs.setdefault("hf_overrides", hf_overrides(architecture, default_settings))
        kwargs.setdefault("worker_extension_cls", planning.WORKER_EXTENSION)  # adaptive budgets' planning pass
        super().__init__(model, **kwargs)
        planning.attach_llm(self)

    def generate(  # type: ignore[override]
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        **kwargs: Any,
    ) -> list[RequestOutput]:
        single = isinstance(prompts, (str, Mapping))
        prompt_list = [prompts] if single else list(prompts)
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            per_prompt = [sampling_params] * len(prompt_list)
        else:
            per_prompt = list(sampling_params)
        call_mm_kwargs = kwargs.pop("mm_processor_kwargs", None)
        folded = [
            with_sampling_settings(prompt, params, call_mm_kwargs) for prompt, params in zip(prompt_list, per_prompt)
        ]
        return super().generate(folded, sampling_params, **kwargs)


def with_sampling_settings(prompt: Any, params: SamplingParams | None, call_mm_kwargs: Mapping | None) -> Any:
    """`prompt` with `params.extra_args["promprune"]` folded into its mm_processor_kwargs.

    `call_mm_kwargs` (generate's own `mm_processor_kwargs`) replaces the prompt's,
    as it does in `vllm.LLM.generate`.
    """
    from_sampling = (params.extra_args or {}).get(SETTINGS_KEY) if params is not None else None
    if from_sampling is not None and not isinstance(from_sampling, Mapping):
        raise ValueError(f"extra_args.{SETTINGS_KEY} must be an object, got {type(from_sampling).__name__}")
    prompt_dict = {"prompt": prompt} if isinstance(prompt, str) else dict(prompt)
    if "multi_modal_data" not in prompt_dict:
        return prompt_dict  # nothing to prune
    mm_kwargs = dict(call_mm_kwargs if call_mm_kwargs is not None else prompt_dict.get("mm_processor_kwargs") or {})
    combined = combine_routes(mm_kwargs.get(SETTINGS_KEY), from_sampling, f"extra_args.{SETTINGS_KEY}.")
    if combined is None:
        if call_mm_kwargs is not None:
            prompt_dict["mm_processor_kwargs"] = mm_kwargs
        return prompt_dict
    prompt_dict["mm_processor_kwargs"] = {**mm_kwargs, SETTINGS_KEY: combined}
    return prompt_dict
