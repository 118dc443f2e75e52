"""One mechanism for the tests that run Triton kernels through its
interpreter on CPU tensors: the `interpreter` marker.

Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. when
fused_resnet.backends.triton.conv2d_fwd is first imported, once per process.
So the marked tests cannot run in an ordinary pytest process:

- without TRITON_INTERPRET=1, the marked tests that pytest selected are set
  aside and one item, `triton-interpreter`, runs exactly those in a child
  pytest started with TRITON_INTERPRET=1 (one child for the whole run). It
  fails unless every one of them ran there and passed: a skip or a missing
  test fails too, so the suite cannot go green by not running them;
- with TRITON_INTERPRET=1 (the child, or by hand:
  `TRITON_INTERPRET=1 pytest tests -m interpreter`), only the marked tests
  run.

tests/conftest.py installs the hooks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
MARKER = "interpreter"
# Settings that would change what the child's tests exercise.
_CLEARED_ENV = ("FUSED_RESNET_BACKEND", "FUSED_RESNET_FUSIONS", "FUSED_RESNET_RELU_SAVES")
_TIMEOUT_S = 2400


class InterpreterSuite(pytest.Item):
    """Runs the selected interpreter tests in a TRITON_INTERPRET=1 child."""

    def __init__(self, *, nodeids: list[str], **kwargs):
        super().__init__(**kwargs)
        self.nodeids = nodeids

    def runtest(self) -> None:
        pytest.importorskip("triton")
        with tempfile.TemporaryDirectory(prefix="fused_resnet-interpreter-") as tmp:
            self._run(Path(tmp))

    def _run(self, tmp: Path) -> None:
        junit = tmp / "interp.xml"
        env = dict(os.environ, TRITON_INTERPRET="1", FUSED_RESNET_CACHE_DIR=str(tmp / "cache"))
        for name in _CLEARED_ENV:
            env.pop(name, None)
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                *self.nodeids]
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=_TIMEOUT_S,
                              cwd=str(self.config.rootpath))
        tail = (proc.stdout + proc.stderr)[-8000:]
        assert junit.exists(), f"the interpreter run wrote no report (exit {proc.returncode}):\n{tail}"
        root = ET.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        assert proc.returncode == 0 and counts["failures"] == counts["errors"] == 0, f"{counts}\n{tail}"
        assert counts["skipped"] == 0 and counts["tests"] == len(self.nodeids), (
            f"expected all {len(self.nodeids)} interpreter tests to run: {counts}\n{tail}")

    def reportinfo(self):
        return self.path, None, f"triton-interpreter ({len(self.nodeids)} tests in a TRITON_INTERPRET=1 child)"


def select(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Called last in pytest_collection_modifyitems, after -k/-m selection."""
    marked = [item for item in items if item.get_closest_marker(MARKER) is not None]
    if IN_INTERPRETER:
        others = [item for item in items if item.get_closest_marker(MARKER) is None]
        if others:
            config.hook.pytest_deselected(items=others)
        items[:] = marked
    elif marked:
        # Not deselected: they run, in the child, and the suite item reports them.
        items[:] = [item for item in items if item.get_closest_marker(MARKER) is None]
        here = Path(__file__)
        items.append(InterpreterSuite.from_parent(
            session, name="triton-interpreter", path=here, nodeid=f"{here.relative_to(config.rootpath)}::triton-interpreter",
            nodeids=[item.nodeid for item in marked]))
