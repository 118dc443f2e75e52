"""The `fused-resnet` command: info | verify | bench."""

from __future__ import annotations

import argparse
import platform
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, _backend

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
    print(f"selected     {_backend.get_backend()}")
    print("backends:")
    for name, av in _backend.availability().items():
        mark = "yes" if av.available else "no "
        print(f"  {name:<19} {mark}  {av.reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-resnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, devices, and which backends can run here")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
