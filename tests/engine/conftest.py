"""Fixtures and helpers of the engine tests (real vLLM on the tiny offline checkpoints).

The offline checkpoints are built once per test session. Test modules import
the helpers from here (`from .conftest import ...`): `tests` is a package, so
pytest and the modules share this one module object.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

Result = tuple[list[int], list[int]]

CPU_HAS_AVX512 = "avx512f" in Path("/proc/cpuinfo").read_text()
"""Machines of this kind come with and without AVX-512 (Intel; AMD EPYC seen 2026-12-01
without). vLLM's CPU kernels round differently on the two, and only the AVX-512 ones were
measured to give a request the same floats batched as solo and under TP=2 as under TP=1;
on AVX2 a batched or all-reduced run can move a near-tie (1 of 6 TP selections, 1 answer
in a ~200-request load). Tests assert those two equalities where they were measured."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a test server)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(llm) -> Iterator[object]:
    """Yield an offline engine (`vllm.LLM` or `PromPruneLLM`); shut its engine core down after."""
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()


_LIVE_IN_PROCESS: list = []  # in-process engines of this test process, not shut down yet
_DEFERRED_SHUTDOWN: list = []  # in-process engines done with, shut down with the last live one
_THREADS_BEFORE_ENGINES: list[int] = []  # this process's torch threads before its first live engine


def _start_in_process(engine_class: type, model_dir: Path, engine_args: dict) -> object:
    """An engine whose engine core and single worker run in this process (vLLM's
    `InprocClient` and `UniProcExecutor`, as in vLLM's own tests): about 2 s to start
    instead of ~30 s for two spawned processes that import torch and vLLM again.

    While in-process engines are live, this process computes with one torch thread, as
    vLLM's CPU worker process does on these machines (bound to one core), so the engine's
    floats are those of the default layout. vLLM freezes its environment cache and
    replaces `torch.set_num_threads` while the engine starts; both are restored here, so
    later engines and servers see this process's real environment.
    """
    import os

    import torch
    import vllm.envs

    if not _LIVE_IN_PROCESS:
        _THREADS_BEFORE_ENGINES.append(torch.get_num_threads())
        torch.set_num_threads(1)
    set_num_threads, previous = torch.set_num_threads, os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        llm = engine_class(str(model_dir), **{"distributed_executor_backend": "uni", **engine_args})
    except BaseException:
        if not _LIVE_IN_PROCESS:
            torch.set_num_threads(_THREADS_BEFORE_ENGINES.pop())
        raise
    finally:
        if previous is None:
            del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous
        vllm.envs.disable_envs_cache()
        torch.set_num_threads = set_num_threads
    _LIVE_IN_PROCESS.append(llm)
    return llm


def _shut_down_in_process(llm) -> None:
    """Shut `llm` down once no other in-process engine is live: an in-process engine's
    shutdown tears down this process's distributed state, which every live engine's
    forward reads (even at world size 1). The last one restores the thread count."""
    import torch

    _LIVE_IN_PROCESS.remove(llm)
    _DEFERRED_SHUTDOWN.append(llm)
    if not _LIVE_IN_PROCESS:
        while _DEFERRED_SHUTDOWN:
            _DEFERRED_SHUTDOWN.pop().llm_engine.engine_core.shutdown()
        torch.set_num_threads(_THREADS_BEFORE_ENGINES.pop())


@contextmanager
def offline_engine(model_dir: Path, engine_args: dict, *, pruned: bool, in_process: bool = True) -> Iterator[object]:
    """A `PromPruneLLM` (or stock `vllm.LLM`) on `model_dir` that tests may ship
    functions to with `apply_model`; shut down after.

    In process by default (`_start_in_process`): the engine core always, the worker too
    unless `engine_args` name another executor (TP: "mp"). `apply_model` functions then
    run in this process: they must undo what they patch, and module-level state of the
    plugin (PROFILED_SELECTIONS, metrics) is shared with every other in-process engine.
    `in_process=False` gives vLLM's default layout (engine core and worker processes).
    """
    if pruned:
        from vllm_promprune.engine.offline import PromPruneLLM as engine_class
    else:
        from vllm import LLM as engine_class

    allow_apply_model()
    if not in_process:
        with serving(engine_class(str(model_dir), **engine_args)) as llm:
            yield llm
        return
    llm = _start_in_process(engine_class, model_dir, engine_args)
    try:
        yield llm
    finally:
        _shut_down_in_process(llm)


def image_request(prompt: str, images: list, settings: dict | None = None) -> dict:
    """An offline request with one image (or several) and optional `promprune` settings."""
    request: dict = {"prompt": prompt, "multi_modal_data": {"image": images[0] if len(images) == 1 else images}}
    if settings is not None:
        request["mm_processor_kwargs"] = {"promprune": settings}
    return request


PLANNED_ROUNDING_MARGIN = 0.02
"""How far (in tokens) keep * c_i / c_ref of an adaptive-budget test image must be from a rounding
boundary: engine and reference complexities differ by float rounding (~1e-6)."""


def planned_budget(reference, image: object, keep: int, signal: str, ref: float) -> int:
    """The K_i an adaptive budget gives `image` (before the clamp to N), from the transformers
    reference's own complexity (`pruning.image_complexity` of `split_inputs`' tokens)."""
    from vllm_promprune.pruning import image_complexity

    patches, projected, _ = reference.split_inputs(image)
    scaled = keep * image_complexity(signal, patches, lambda: projected) / ref
    assert abs(scaled - int(scaled) - 0.5) > PLANNED_ROUNDING_MARGIN, f"{scaled}: too close to a rounding boundary"
    return max(1, round(scaled))


def greedy_params(max_tokens: int = 8, logprobs: int | None = None):  # noqa: ANN201
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs)


def run(llm, requests: list[dict], **sampling: int | None) -> list[Result]:
    """(prompt token ids, generated token ids) per request, greedy, no early stop."""
    outputs = llm.generate(requests, greedy_params(**sampling), use_tqdm=False)
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outputs]


def assert_bit_identical(stock_llm, pruned_llm, stock_requests: list[dict], pruned_requests: list[dict]) -> None:
    """Greedy runs of the two engines give the same prompt ids, tokens and top-3 logprob floats."""
    stock = stock_llm.generate(stock_requests, greedy_params(logprobs=3), use_tqdm=False)
    pruned = pruned_llm.generate(pruned_requests, greedy_params(logprobs=3), use_tqdm=False)
    assert len(stock) == len(pruned) == len(stock_requests)
    for s, p in zip(stock, pruned):
        assert p.prompt_token_ids == s.prompt_token_ids
        assert p.outputs[0].token_ids == s.outputs[0].token_ids
        assert p.outputs[0].logprobs == s.outputs[0].logprobs  # exact floats


def _argument(name: str, index: int, args: tuple, kwargs: dict):  # noqa: ANN202
    return kwargs[name] if name in kwargs else args[index]


def start_recording_positions(model) -> None:
    """Record the positions the language model used in every forward pass (run through
    `LLM.apply_model`): the tensor the runner passed to the model's `forward`, read after
    it returns (the pruned Qwen models add the kept tokens' offsets to it in place).

    Wraps the top-level `forward` only, which vLLM runs eagerly also when the language
    model is compiled (enforce_eager=False).
    """
    recorded: list = []
    forward = model.forward

    def recording_forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = forward(*args, **kwargs)
        recorded.append(_argument("positions", 1, args, kwargs).detach().cpu().clone())
        return result

    model.forward = recording_forward
    model.recorded_positions = recorded


def start_recording_buffers(model) -> None:
    """Record, for every forward pass of an eager engine, whether the decoder received the
    very storage (`data_ptr`) of the positions and inputs_embeds the runner passed to the
    model (CUDA graphs replay against captured addresses), and whether M-RoPE offsets
    were pending (`take_recorded_buffers`)."""
    recorded: list = []
    forward, decoder_forward = model.forward, model.language_model.model.forward
    passed: dict = {}

    def recording_forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        passed["positions"] = _argument("positions", 1, args, kwargs).data_ptr()
        passed["inputs_embeds"] = kwargs["inputs_embeds"].data_ptr() if kwargs.get("inputs_embeds") is not None else None
        passed["offsets"] = getattr(model, "_pending_offsets", None) is not None
        return forward(*args, **kwargs)

    def recording_decoder(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        embeds = kwargs.get("inputs_embeds")
        recorded.append((
            passed["offsets"],
            kwargs["positions"].data_ptr() == passed["positions"],
            (embeds.data_ptr() if embeds is not None else None) == passed["inputs_embeds"],
        ))
        return decoder_forward(*args, **kwargs)

    model.forward, model.language_model.model.forward = recording_forward, recording_decoder
    model.recorded_buffers = (forward, decoder_forward, recorded)


def take_recorded_buffers(model) -> list[tuple[bool, bool, bool]]:
    """(offsets pending, same positions storage, same inputs_embeds storage) per forward
    pass since `start_recording_buffers`; stops recording."""
    model.forward, model.language_model.model.forward, recorded = model.recorded_buffers
    del model.recorded_buffers
    return recorded


def forget_profiled_selections() -> None:
    """Clear this process's record of memory-profile selections (before starting an
    in-process engine whose own profile a test reads with `profiled_selections`)."""
    from vllm_promprune.engine.models.common import PROFILED_SELECTIONS

    PROFILED_SELECTIONS.clear()


def profiled_selections(model) -> list[tuple[str, int, int, int]]:
    """(method, N, K, images) of every selection vLLM's memory profile ran in the worker."""
    from vllm_promprune.engine.models.common import PROFILED_SELECTIONS

    return list(PROFILED_SELECTIONS)


def take_recorded_positions(model):  # noqa: ANN201
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


def start_recording_towers(model) -> None:
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


def take_recorded_towers(model) -> bytes:
    """The recorded tower outputs as `torch.save` bytes of [(hidden, saliency, keys, projected,
    features)]: `projected` by the model's own projector, each image alone; `features` as the
    tower gave them (Qwen: its stock merger output) or None; stops recording."""
    import io

    import torch

    module, name, original, recorded = model.tower_recording
    setattr(module, name, original)
    del model.tower_recording
    if hasattr(model, "visual"):  # Qwen2.5-VL: the tower's merger
        from vllm_promprune.families.qwen_vision import merger_projection

        project = merger_projection(model.visual.merger)
    else:
        project = model.multi_modal_projector
    with torch.inference_mode():
        rows = [(t.hidden, t.saliency, t.keys, project(t.hidden[:, 1:]), t.features) for t in recorded]
    buffer = io.BytesIO()
    torch.save(rows, buffer)
    return buffer.getvalue()


def project_in_engine(groups: bytes, model) -> bytes:
    """`torch.save` bytes of `groups` (themselves `torch.save` bytes of a Qwen merger
    input [..., 4 * Dv]) projected by the engine's own merger, as one call."""
    import io

    import torch

    from vllm_promprune.families.qwen_vision import merger_projection

    with torch.inference_mode():
        projected = merger_projection(model.visual.merger)(torch.load(io.BytesIO(groups)))
    buffer = io.BytesIO()
    torch.save(projected, buffer)
    return buffer.getvalue()


def take_tower_runs(model) -> int:
    """How many tower inputs (images, or LLaVA-NeXT views) the pruning path ran since
    `start_recording_towers`; stops recording."""
    module, name, original, recorded = model.tower_recording
    setattr(module, name, original)
    del model.tower_recording
    return sum(t.hidden.shape[0] for t in recorded)


def tower_runs(llm, requests: list[dict]) -> int:
    """Tower inputs the engine ran for pruning while serving `requests` (one batch)."""
    llm.apply_model(start_recording_towers)
    run(llm, requests, max_tokens=1)
    return sum(llm.apply_model(take_tower_runs))


def engine_tower_outputs(llm, requests: list[dict]) -> list[tuple]:
    """(hidden, saliency, keys, projected, features) the engine computes for each request's one image.

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
    """Max abs difference per field (hidden, saliency, keys, projected) over all images (an
    engine tuple's `features` is not compared)."""
    fields = ("hidden", "saliency", "keys", "projected")
    worst = dict.fromkeys(fields, 0.0)
    for ours, theirs in zip(engine, reference, strict=True):
        for field, a, b in zip(fields, ours, theirs):
            if a is not None and b is not None:
                assert a.shape == b.shape, (field, a.shape, b.shape)
                worst[field] = max(worst[field], float((a.float() - b.float()).abs().max()))
    return worst


def guard_noise(measured: dict[str, float], floor: dict[str, float]) -> dict[str, float]:
    """Std of the noise a margin guard adds to each field of the reference's tower outputs:
    10x the engine-vs-reference difference `measured` on THIS machine (vLLM's CPU kernels
    round differently with and without AVX-512), and never below `floor`, the noise the
    cases were first checked with."""
    return {field: max(floor[field], 10 * measured[field]) for field in floor}


def jittered(tower, jitter: dict[str, float], generator):  # noqa: ANN201
    """`tower` (a TowerOutput) plus Gaussian noise of std `jitter[field]` on hidden, saliency and keys."""
    import torch

    from vllm_promprune.pruning import TowerOutput

    def noisy(values, field: str):  # noqa: ANN202
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


def selections(prune, tower) -> list:
    """Every choice `prune(tower)` makes (see `recorded_selections`)."""
    import torch

    with torch.inference_mode(), recorded_selections() as record:
        prune(tower)
    return record


def engine_selections(llm, requests: list[dict]) -> list[list]:
    """Every choice (`recorded_selections`) the in-process engine makes for each request, run
    alone (its selection runs in this process); each request must miss the caches."""
    chosen = []
    for request in requests:
        with recorded_selections() as record:
            run(llm, [request], max_tokens=1)
        chosen.append(record)
    return chosen


def same_selections(a: list, b: list) -> bool:
    import torch

    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _tiny(tmp_path_factory: pytest.TempPathFactory, family: str) -> Path:
    """The family's tiny offline checkpoint, seed 0, built once per session."""
    from vllm_promprune.testing.checkpoints import BUILDERS

    return BUILDERS[family](tmp_path_factory.mktemp("models") / f"{family}-tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(tmp_path_factory, "llava")


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(tmp_path_factory, "llava-next")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(tmp_path_factory, "qwen2.5-vl")


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(tmp_path_factory, "qwen2-vl")


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(tmp_path_factory, "qwen3-vl")


@pytest.fixture(scope="session")
def tiny_qwen3_vl_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(tmp_path_factory, "qwen3-vl-moe")


class ImageCases:
    """Images of named sizes for one family's tests, and offline requests for them.

    `sizes` maps a size name to (width, height); `reference_seeds` gives the
    textured image each size uses in the reference comparisons by default.
    """

    def __init__(self, prompt: str, sizes: dict[str, tuple[int, int]], reference_seeds: dict[str, int]) -> None:
        self.prompt, self.sizes, self.reference_seeds = prompt, sizes, reference_seeds

    def scene(self, size: str, seed: int = 4):  # noqa: ANN201 (PIL image)
        from vllm_promprune.testing.synthetic import scene_image

        return scene_image(seed, *self.sizes[size])

    def textured(self, size: str, seed: int | None = None):  # noqa: ANN201 (PIL image)
        """The textured image of `size` (by default the reference image of that size)."""
        from vllm_promprune.testing.synthetic import textured_image

        return textured_image(self.reference_seeds[size] if seed is None else seed, *self.sizes[size])

    def request(self, images: list, settings: dict | None = None, prompt: str | None = None) -> dict:
        return image_request(self.prompt if prompt is None else prompt, images, settings)


def assert_stock_prompts_match_transformers(stock_llm, checkpoint: Path, cases: ImageCases) -> None:
    """Stock vLLM runs the offline checkpoint, and its prompt for a scene of each of the
    cases' sizes is exactly what the checkpoint's transformers processor makes of it."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    for size in cases.sizes:
        image = cases.scene(size, 70)
        expected = processor(images=[image], text=cases.prompt, return_tensors="pt")["input_ids"][0].tolist()
        (ids, tokens), = run(stock_llm, [cases.request([image])], max_tokens=2)
        assert ids == expected, size
        assert len(tokens) == 2
