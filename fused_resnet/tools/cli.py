"""The `fused-resnet` command: info | verify | bench | layers | roofline."""

from __future__ import annotations

import argparse
import platform
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .. import __version__, dispatch

    print(f"fused_resnet {__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    try:
        import triton

        print(f"triton       {triton.__version__}")
    except Exception as exc:  # noqa: BLE001
        print(f"triton       not importable ({type(exc).__name__})")
    try:
        import torchvision

        print(f"torchvision  {torchvision.__version__}")
    except Exception:  # noqa: BLE001
        print("torchvision  not installed (needed for comparisons and convert())")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"device       cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        print("device       cpu only (no CUDA GPU visible)")
    print(f"cpu threads  {torch.get_num_threads()}")
    print(f"selected     {dispatch.get_backend()}")
    from .. import config

    print("settings (docs/configuration.md; the value, where it came from, the variable read at import):")
    for name, value, source, env in config.describe():
        print(f"  {name:<19} {value:<44} {source:<20} ${env}")
    print("backends:")
    for name, av in dispatch.availability().items():
        mark = "yes" if av.available else "no "
        print(f"  {name:<19} {mark}  {av.reason}")
    print("cudnn fallbacks: layers whose fused graph cuDNN refuses run as cuDNN/aten conv + our epilogue; "
          "`fused-resnet bench` lists them per row, fused_resnet.backends.cudnn.graphs.fallbacks() in your process")
    return 0


_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v

    return parse


def _non_negative(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--warmup must be an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"--warmup must be >= 0, got {v}")
    return v


def parse_budgets(text: str | None, option: str = "--budget") -> dict[str, float] | None:
    """"SECONDS" (every provider) or "name=SECONDS,...[,SECONDS]" (the bare
    number for the providers not named) -> {name or "*": seconds}."""
    if text is None:
        return None
    out: dict[str, float] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.rpartition("=")
        key = name.strip() if sep else "*"
        if sep and not key:
            raise ValueError(f"{option}: {item!r} names no provider (expected name=SECONDS)")
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"{option}: {value.strip()!r} in {item!r} is not a number of seconds") from None
        if not seconds >= 0:
            raise ValueError(f"{option}: seconds must be >= 0, got {value.strip()!r} in {item!r}")
        if key in out:
            raise ValueError(f"{option}: {'the default' if key == '*' else repr(key)} is given twice")
        out[key] = seconds
    if not out:
        raise ValueError(f"{option} is empty")
    return out


def _resolve_common(parser: argparse.ArgumentParser, args: argparse.Namespace, what: str):
    """Checks shared by verify, bench and roofline; returns (device, dtype key).

    fp16 is refused on CPU: CPU convolutions have no fast fp16 path on most
    CPUs (and some have none at all), so the figures would mean nothing.
    bf16 on CPU is allowed (oneDNN runs it, slowly without AMX)."""
    import torch

    from .bench.models import ModelSpecError, eager_builder

    if args.model is not None:
        try:
            eager_builder(args.model)
        except ModelSpecError as exc:
            parser.error(str(exc))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        parser.error(f"--device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"--device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible here (torch.cuda.is_available() is False)")
    dtype = None
    if args.dtype is not None:
        dtype = _DTYPE_NAMES.get(args.dtype.lower())
        if dtype is None:
            parser.error(f"--dtype must be one of fp32, bf16, fp16, got {args.dtype!r}")
        if dtype == "fp16" and dev.type == "cpu":
            parser.error(f"--dtype fp16 is not supported on CPU for {what} (no fast fp16 convolutions there); "
                         "use fp32 or bf16")
    if getattr(args, "image_size", None) is not None and args.image_size < 32:
        parser.error(f"--image-size must be >= 32 (ResNets downsample 32x), got {args.image_size}")
    return device, dtype


def _load_state_dict(parser: argparse.ArgumentParser, path: str) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        parser.error(f"--state-dict: no such file {path!r}")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        parser.error(f"--state-dict: cannot load {path!r} ({type(exc).__name__}: {exc})")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        parser.error(f"--state-dict: {path!r} does not hold a state_dict (a dict of tensors)")
    return obj


def _cmd_verify(args: argparse.Namespace) -> int:

    from .bench import verify as V
    from .bench.runner import DTYPES

    parser = args.parser
    if args.model is None:
        parser.error("--model is required (the architecture, also with --state-dict)")
    device, dtype = _resolve_common(parser, args, "verify")
    dtype = dtype or "fp32"
    sd = _load_state_dict(parser, args.state_dict) if args.state_dict else None
    backends = None
    if args.backend:
        from .. import dispatch

        backends = []
        for b in args.backend.split(","):
            try:
                backends.append(dispatch.validate(b))
            except dispatch.BackendError as exc:
                parser.error(f"--backend: {exc}")
    modes = ("train", "eval") if args.mode == "both" else (args.mode,)
    try:
        result, note = V.verify(args.model, backends=backends, state_dict=sd, batch_size=args.batch_size,
                                image_size=args.image_size, dtype=DTYPES[dtype], device=device, modes=modes,
                                channels_last=args.channels_last, seed=args.seed)
    except RuntimeError as exc:
        if args.state_dict and "state_dict" in str(exc):
            detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
            parser.error(f"--state-dict does not match {args.model}: {detail[:240]}")
        raise
    print(f"verify {args.model}: batch {args.batch_size}, {args.image_size}x{args.image_size}, {dtype}, {device}, "
          f"{'channels_last' if args.channels_last else 'contiguous'}; fused vs torchvision eager vs fp64 reference")
    if note:
        print(f"note: {note}")
    print(V.format_result(result, verbose=not args.failures_only))
    print("PASS" if result.ok else "FAIL")
    return 0 if result.ok else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import report
    from .bench.providers import parse_provider_names
    from .bench.runner import BenchConfig, defaults_for, failed, run_bench

    parser = args.parser
    from .bench.models import is_builtin

    if args.model is not None and not is_builtin(args.model) and args.layers:
        parser.error(f"--layers: --model {args.model!r}: per-layer classes exist for fused_resnet's builders only")
    device, dtype = _resolve_common(parser, args, "bench")
    d = defaults_for(device)
    try:
        names = parse_provider_names(args.providers)
    except ValueError as exc:
        parser.error(f"--providers: {exc}")
    try:
        budgets = parse_budgets(args.budget)
        layer_budgets = parse_budgets(args.layer_budget, "--layer-budget")
    except ValueError as exc:
        parser.error(str(exc))
    from .bench.providers import ALL_PROVIDERS

    unknown = sorted(set(budgets or {}) - set(ALL_PROVIDERS) - {"*"})
    if unknown:
        parser.error(f"--budget: unknown provider {unknown[0]!r}; expected one of {', '.join(ALL_PROVIDERS)}")
    cfg = BenchConfig(
        model=args.model or d["model"], batch_size=args.batch_size or d["batch_size"],
        image_size=args.image_size or d["image_size"], dtype=dtype or d["dtype"], device=device,
        modes=("inference", "train") if args.mode == "both" else (args.mode,),
        steps=args.steps or d["steps"], warmup=d["warmup"] if args.warmup is None else args.warmup,
        channels_last=not args.contiguous, providers=names, measure_memory=not args.no_memory,
        compile_mode=args.compile_mode, relu_saves=args.relu_saves, interleave=not args.sequential,
        budgets=budgets, layers=args.layers, layer_budgets=layer_budgets,
    )
    # With --json the file holds every final row as soon as it exists, so a
    # run killed by an outer time limit keeps what it measured.
    on_update = (lambda partial: report.write_json(partial, args.json)) if args.json else None
    result = run_bench(cfg, progress=not args.quiet, on_update=on_update)
    if args.roofline:
        from .bench.roofline import roofline

        net = {f"{r['provider']} inference": r["images_per_s"] for r in result["results"]
               if r["mode"] == "inference" and r["images_per_s"]}
        result["roofline"] = roofline(cfg.model, cfg.batch_size, cfg.image_size, cfg.torch_dtype, device,
                                      channels_last=cfg.channels_last, network_images_per_s=net)
    print(report.format_table(result))
    if result.get("layers"):
        from .bench.layers import format_layers

        print()
        print(format_layers(result["layers"]))
    if args.roofline:
        from .bench.roofline import format_roofline

        print()
        print(format_roofline(result["roofline"]))
    if args.json:
        report.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        why = report.write_plot(result, args.plot)
        print(f"wrote {args.plot}" if why is None else f"no chart: {why}")
    return 1 if failed(result) else 0


def _cmd_layers(args: argparse.Namespace) -> int:
    import torch

    from .. import dispatch
    from .bench import report
    from .bench.auto_choice import derive, format_choice
    from .bench.layers import EAGER, MODES, LayersConfig, format_layers, run_layers
    from .bench.runner import defaults_for
    from .bench.models import is_builtin

    if args.model is not None and not is_builtin(args.model):
        args.parser.error(f"layers: --model {args.model!r}: the per-layer classes are a torchvision ResNet's "
                          "(stem, inner, last, downsample); give one of fused_resnet's builders (resnet50, ...)")

    parser = args.parser
    device, dtype = _resolve_common(parser, args, "layers")
    d = defaults_for(device)
    if args.backends:
        backends = [b.strip().lower() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in backends if b not in dispatch.BACKENDS and b != EAGER]
        if unknown or not backends:
            parser.error(f"--backends: unknown backend {unknown[0] if unknown else '(none)'!r}; expected "
                         f"{', '.join(dispatch.BACKENDS)}")
    else:
        backends = [b for b in ("cpu", "cuda", "cudnn", "triton") if dispatch.resolve(b, torch.device(device)) == b]
    try:
        budgets = parse_budgets(args.budget)
    except ValueError as exc:
        parser.error(str(exc))
    cfg = LayersConfig(model=args.model or d["model"], batch_size=args.batch_size or d["batch_size"],
                       image_size=args.image_size or d["image_size"], dtype=dtype or d["dtype"], device=device,
                       backends=tuple(backends), modes=MODES if args.mode == "both" else (args.mode,),
                       steps=args.steps, warmup=args.warmup, channels_last=not args.contiguous, budgets=budgets)
    on_update = (lambda partial: report.write_json(partial, args.json)) if args.json else None
    rec = run_layers(cfg, on_update=on_update, progress=not args.quiet)
    print(format_layers(rec))
    choice = derive(rec)
    print()
    print(format_choice(choice))
    if args.json:
        report.write_json(rec, args.json)
        print(f"wrote {args.json}")
    if args.auto_choice:
        report.write_json(choice, args.auto_choice)
        print(f"wrote {args.auto_choice}")
    return 0


def _cmd_roofline(args: argparse.Namespace) -> int:
    from .bench import report
    from .bench.roofline import format_roofline, roofline
    from .bench.runner import DTYPES, defaults_for

    device, dtype = _resolve_common(args.parser, args, "roofline")
    d = defaults_for(device)
    r = roofline(args.model or d["model"], args.batch_size or d["batch_size"], args.image_size or d["image_size"],
                 DTYPES[dtype or d["dtype"]], device, channels_last=not args.contiguous, steps=args.steps)
    print(format_roofline(r))
    if args.json:
        report.write_json(r, args.json)
        print(f"wrote {args.json}")
    return 0


def _add_model_args(p: argparse.ArgumentParser, batch_default, image_default) -> None:
    p.add_argument("--model", help="resnet18, resnet50, ... (fused_resnet's builders), or any model fuse() takes: "
                                    "torchvision:NAME, timm:NAME, package.module:function, path/file.py:function "
                                    "(logits out); `layers` takes the builders' names only")
    p.add_argument("--batch-size", type=_positive("--batch-size"), default=batch_default)
    p.add_argument("--image-size", type=_positive("--image-size"), default=image_default)
    p.add_argument("--dtype", help="fp32 | bf16 | fp16 (fp16 is GPU only)")
    p.add_argument("--device", help="cpu | cuda[:N] (default: cuda when visible)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-resnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, devices, and which backends can run here")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("verify", help="fused model vs torchvision eager vs fp64, per block; exit 1 on failure",
                       description="Compare the fused model on each available backend (or --backend) with "
                                   "torchvision's eager model with the same weights, against an fp64 CPU reference: "
                                   "block outputs and logits in train and eval mode, parameter gradients, running "
                                   "statistics. Criterion: fused_resnet.numerics.")
    _add_model_args(p, batch_default=4, image_default=64)
    p.add_argument("--state-dict", metavar="FILE", help="weights to verify with (torch.save'd state_dict; needs --model)")
    p.add_argument("--backend", help="comma-separated fused backends (default: every one that can run here)")
    p.add_argument("--mode", choices=("train", "eval", "both"), default="both")
    p.add_argument("--channels-last", action="store_true", help="run eager and fused in channels_last")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--failures-only", action="store_true", help="print only the failing rows")
    p.set_defaults(func=_cmd_verify, parser=p)

    p = sub.add_parser("bench", help="fused vs eager vs torch.compile, side by side (the main job)",
                       description="Images/s, latency, peak memory and verified error of every provider, "
                                   "side by side in one process. Defaults: GPU -> resnet50 bf16 channels_last batch "
                                   "256 224x224; CPU -> resnet50 fp32 batch 8 224x224.")
    _add_model_args(p, batch_default=None, image_default=None)
    p.add_argument("--mode", choices=("inference", "train", "both"), default="both")
    p.add_argument("--providers", help="comma-separated: eager, channels_last, amp, compile, fused-cpu, "
                                       "fused-cuda, fused-cudnn, fused-triton, fused-triton+prologue (training "
                                       "only), or fused (the four backends); default all")
    p.add_argument("--steps", type=_positive("--steps"), help="timed steps (default: 5 on CPU, 20 on GPU)")
    p.add_argument("--warmup", type=_non_negative, help="warm-up steps, the first call included (default 2 / 5)")
    p.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last for non-eager providers")
    p.add_argument("--no-memory", action="store_true", help="skip the (untimed) peak-memory step")
    p.add_argument("--sequential", action="store_true",
                   help="build, time and finish each provider before the next (its row is final, and in "
                        "--json, at once); default: in rounds, one step of every provider per round, so "
                        "drift in the machine's speed hits all alike")
    p.add_argument("--budget", metavar="SPEC",
                   help="seconds each provider may spend per mode (build, first call, warm-up, timed steps): "
                        "SECONDS for all, or name=SECONDS,...[,SECONDS for the rest]; a provider that runs out "
                        "is recorded as 'over budget' with the steps it timed, and the next one runs")
    p.add_argument("--compile-mode", choices=("auto", "default", "reduce-overhead", "max-autotune"), default="auto",
                   help="torch.compile mode for inference (auto: max-autotune on GPU, default on CPU); "
                        "training always uses the default mode")
    p.add_argument("--relu-saves", choices=("mask", "output"), default=None,
                   help="what fused training keeps for the ReLU backward: the output the next conv saves anyway "
                        "(default: no more memory than eager) or a 1-bit mask beside it; see set_relu_saves")
    p.add_argument("--layers", action="store_true",
                   help="after each mode's rows, time every conv unit alone on each fused backend that ran, "
                        "beside eager modules, in this process (see `fused-resnet layers`); printed and in --json")
    p.add_argument("--layer-budget", metavar="SPEC",
                   help="seconds per backend and mode for --layers: SECONDS or backend=SECONDS,...[,SECONDS]")
    p.add_argument("--roofline", action="store_true", help="also print the per-conv roofline report")
    p.add_argument("--json", metavar="PATH", help="write every figure, the device and versions as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG chart of images/s (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench, parser=p)

    p = sub.add_parser("layers", help="every conv unit timed alone per fused backend, by layer class, "
                                      "with its roofline and the fastest backend per class",
                       description="Each conv unit of the network (conv + BN [+ residual] [+ ReLU]) at its shape, "
                                   "timed alone on each backend and with eager modules, keyed by layer class "
                                   "(mode/role/kernel/stride, see fused_resnet/tools/bench/layers.py); then the "
                                   "fastest backend per class (fused_resnet/tools/bench/auto_choice.py).")
    _add_model_args(p, batch_default=None, image_default=None)
    p.add_argument("--backends", help="comma-separated fused backends (default: every one that runs here)")
    p.add_argument("--mode", choices=("inference", "train", "both"), default="both")
    p.add_argument("--steps", type=_positive("--steps"), default=10)
    p.add_argument("--warmup", type=_non_negative, default=3)
    p.add_argument("--contiguous", action="store_true")
    p.add_argument("--budget", metavar="SPEC", help="seconds per backend and mode: SECONDS or "
                                                    "backend=SECONDS,...[,SECONDS]")
    p.add_argument("--json", metavar="PATH", help="the per-layer record (written after each layer)")
    p.add_argument("--auto-choice", metavar="PATH", help="the fastest backend per layer class, as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_layers, parser=p)

    p = sub.add_parser("roofline", help="per-conv FLOPs, bytes, time and fraction of the device's peak")
    _add_model_args(p, batch_default=None, image_default=None)
    p.add_argument("--steps", type=_positive("--steps"), default=5)
    p.add_argument("--contiguous", action="store_true")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(func=_cmd_roofline, parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
