"""Running a test module's `test_interp_*` tests in a TRITON_INTERPRET=1 child.

Triton reads TRITON_INTERPRET when @triton.jit decorates a function, i.e. when
fused_resnet.backends.triton.conv2d_fwd is first imported, and a pytest process
imports it once for every module. So a module's interpreter tests run only in
a child pytest started with TRITON_INTERPRET=1 before anything is imported;
the parent never has the variable set and other modules are unaffected. The
child reports through a JUnit file, and the parent fails unless every
interpreter test ran and passed (a child that skipped or collected nothing
fails too). By hand: `TRITON_INTERPRET=1 pytest <module> -k interp`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Settings that would change what the child's tests exercise.
_CLEARED_ENV = ("FUSED_RESNET_BACKEND", "FUSED_RESNET_FUSIONS", "FUSED_RESNET_RELU_SAVES")


def run_interp_tests(module_file: str, tmp_path, expected: int) -> None:
    """Run module_file's test_interp_* tests in the child; assert that exactly
    `expected` tests ran and all passed."""
    if IN_INTERPRETER:
        pytest.skip("already inside the interpreter run")
    pytest.importorskip("triton")
    junit = tmp_path / "interp.xml"
    env = dict(os.environ, TRITON_INTERPRET="1", FUSED_RESNET_CACHE_DIR=str(tmp_path / "cache"))
    for name in _CLEARED_ENV:
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", module_file, "-q", "-k", "interp and not interpreter_suite",
         "-p", "no:cacheprovider", f"--junitxml={junit}"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert junit.exists(), f"interpreter run wrote no report (exit {proc.returncode}):\n{tail}"
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    assert proc.returncode == 0 and counts["failures"] == counts["errors"] == 0, f"{counts}\n{tail}"
    assert counts["skipped"] == 0 and counts["tests"] == expected, f"expected {expected} tests to run: {counts}\n{tail}"


def drop_interp_tests_outside_the_interpreter(namespace: dict) -> None:
    """Outside the interpreter the test_interp_* functions are removed from
    the module, so they are neither run nor reported as skipped there."""
    if not IN_INTERPRETER:
        for name in [n for n in namespace if n.startswith("test_interp_")]:
            del namespace[name]


def count_kernel_launches(monkeypatch, *names: str) -> dict[str, int]:
    """Count launches (kernel[grid](...)) of the named Triton kernels of
    fused_resnet.backends.triton.launch, e.g. "conv2d_fwd_prologue_kernel", for the
    rest of the test; returns the live {name: count} dict. Launches made
    while autotuning (timing candidate configs on a GPU) are not counted."""
    from fused_resnet.backends.triton import launch

    counts = dict.fromkeys(names, 0)

    class Spy:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            if not launch.tuning():
                counts[self.name] += 1
            return self.kernel[grid]

    for name in names:
        monkeypatch.setattr(launch, name, Spy(getattr(launch, name), name))
    return counts
