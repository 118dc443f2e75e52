"""What a result was measured on: device, versions, git commit."""

from __future__ import annotations

import os
import platform
import subprocess

import torch


COMMIT_ENV = "FUSED_RESNET_GIT_COMMIT"


def git_commit() -> str | None:
    """HEAD (with "-dirty" for uncommitted changes to tracked files), else
    $FUSED_RESNET_GIT_COMMIT: the GPU machine gets a copy of the working tree
    without .git, so the device call names the commit (`make gpu-call`)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get(COMMIT_ENV) or None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def describe(device: torch.device | str) -> dict:
    from ... import __version__

    device = torch.device(device)
    env = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "fused_resnet": __version__,
        "git_commit": git_commit(),
        "platform": platform.platform(),
        # Other processes competing for the cores distort CPU timings badly.
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
    }
    for mod in ("torchvision", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is recorded, not fatal
            env[mod] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["compute_capability"] = f"{p.major}.{p.minor}"
        env["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        env["cudnn"] = torch.backends.cudnn.version()
        env["driver"] = _driver_version()
    return env
