"""examples/train.py runs as its docstring says: 2 Gloo processes through
torchrun with synchronised BatchNorm, a checkpoint, and a resume from it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import REPO

ROOT = str(REPO)
TRAIN = os.path.join(ROOT, "examples", "train.py")


def _run(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout


def test_two_gloo_processes_with_sync_bn_checkpoint_and_resume(tmp_path):
    pytest.importorskip("sklearn")
    ckpt = tmp_path / "ck.pt"
    common = ["--model", "d2l_resnet18", "--batch-size", "16", "--image-size", "32", "--checkpoint", str(ckpt)]
    out = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TRAIN, "--sync-bn",
                "--steps", "3", *common])
    assert "fused" in out and "conv+bn+add+relu" in out, out
    losses = [float(v) for v in re.findall(r"step \d+ loss ([0-9.]+)", out)]
    assert len(losses) == 3 and all(v == v for v in losses), out
    assert ckpt.exists() and "saved" in out
    assert re.search(r"test accuracy [0-9.]+", out)
    out = _run([TRAIN, "--resume", "--steps", "4", *common])
    assert "resumed from" in out and "at step 3" in out and "step 4 loss" in out, out
