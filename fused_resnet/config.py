"""Every switch of fused_resnet and every environment variable it knows, in
one place.

Settings (SETTINGS) are read from the environment once, when fused_resnet
is imported, and validated there: a value that does not parse is warned
about and the default kept (importing never fails because of the
environment). After import they change only through the functions named in
the table (fused_resnet.set_backend, set_fusions, set_relu_saves,
set_autotune, set_cpu_cache_limit), never by editing os.environ. `fused-resnet
info` prints each with its value and where that came from. Variables the
library itself does not read (the build's, the tests', the benchmarks', the
tools') are listed in OTHER_VARIABLES, so that one table names them all;
docs/configuration.md is generated from both (markdown_table()).

torch.compile traces the values its graph reads; change a setting before
compiling, or call torch._dynamo.reset() after (fused_resnet._compat.
reset_compiled()).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

BACKEND_NAMES = ("auto", "reference", "cpu", "cuda", "cudnn", "triton")
FUSION_NAMES = ("shortcut_gemm", "prologue", "prologue_dgrad")
RELU_SAVES = ("output", "mask")
_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def _parse_backend(text: str) -> str:
    name = text.strip().lower()
    if name not in BACKEND_NAMES:
        raise ValueError(f"expected one of {', '.join(BACKEND_NAMES)}")
    return name


def _parse_fusions(text: str) -> dict[str, bool]:
    out = dict(FUSION_DEFAULTS)
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, value = item.partition("=")
        name, value = name.strip().lower(), value.strip().lower()
        if name not in out or value not in _TRUE + _FALSE:
            raise ValueError(f"{item!r}: expected name=0 or name=1 with name one of {', '.join(FUSION_NAMES)}")
        out[name] = value in _TRUE
    return out


def _parse_flag(text: str) -> bool:
    value = text.strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError("expected 0 or 1")
    return value in _TRUE


def _parse_choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _parse_seconds(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not value >= 0:
        raise ValueError("expected a number of seconds >= 0")
    return value


def _parse_mib(text: str) -> int:
    """MiB in the environment, bytes in the setting."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError("expected a whole number of MiB >= 0 (0 turns the cache off)") from None
    if value < 0:
        raise ValueError("expected a whole number of MiB >= 0 (0 turns the cache off)")
    return value << 20


def _default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fused_resnet"


# name -> on by default. shortcut_gemm: the projection shortcut as a second
# GEMM in a block's last conv (eval, triton). prologue: each BN + ReLU inside
# a block applied in the next conv's prologue (training, triton; off until a
# GPU run shows it faster: the prologue moves the A tile through registers).
# prologue_dgrad: with the prologue, the backward of each stride-1 prologue
# conv fuses the prologue's ReLU + BN backward into its data gradient.
FUSION_DEFAULTS: dict[str, bool] = {"shortcut_gemm": True, "prologue": False, "prologue_dgrad": True}


@dataclass(frozen=True)
class Setting:
    name: str
    env: str
    default: Any
    parse: Callable[[str], Any]
    change: str  # how to change it at run time
    meaning: str


SETTINGS: tuple[Setting, ...] = (
    Setting("backend", "FUSED_RESNET_BACKEND", "auto", _parse_backend, "fused_resnet.set_backend(name)",
            "the backend of every fused module without one of its own: auto, reference, cpu, cuda, cudnn, "
            "triton (docs/backends.md)"),
    Setting("fusions", "FUSED_RESNET_FUSIONS", FUSION_DEFAULTS, _parse_fusions,
            "fused_resnet.set_fusions(name=bool, ...)",
            "optional fusions for ablations, e.g. `shortcut_gemm=0,prologue=1` (shortcut_gemm, prologue, "
            "prologue_dgrad; docs/backends.md)"),
    Setting("relu_saves", "FUSED_RESNET_RELU_SAVES", "output", _parse_choice(RELU_SAVES),
            "fused_resnet.set_relu_saves(mode)",
            "what the fused BN + ReLU keeps for backward: the ReLU output the next conv saves anyway "
            "(output), or a 1-bit mask beside it (mask)"),
    Setting("autotune", "FUSED_RESNET_AUTOTUNE", True, _parse_flag, "fused_resnet.set_autotune(flag)",
            "time every Triton conv config on first sight of a shape (1), or take the first candidate untimed "
            "(0, as the test suite does)"),
    Setting("autotune_shape_s", "FUSED_RESNET_AUTOTUNE_SHAPE_S", None, _parse_seconds,
            "fused_resnet.set_autotune(shape_s=...)",
            "seconds one shape may spend autotuning before its best config so far is kept (unset: no cap)"),
    Setting("autotune_run_s", "FUSED_RESNET_AUTOTUNE_RUN_S", None, _parse_seconds,
            "fused_resnet.set_autotune(run_s=...)",
            "seconds a process may spend autotuning; later shapes take their first config untimed "
            "(unset: no cap)"),
    Setting("autotune_log", "FUSED_RESNET_AUTOTUNE_LOG", None, lambda t: t.strip() or None,
            "fused_resnet.set_autotune(log=path)", "a file that receives one JSON line per tuned shape"),
    Setting("cache_dir", "FUSED_RESNET_CACHE_DIR", None, lambda t: Path(t.strip()) if t.strip() else None,
            "fused_resnet.set_cache_dir(path)",
            "where Triton autotune results are cached (default $XDG_CACHE_HOME/fused_resnet or "
            "~/.cache/fused_resnet)"),
    Setting("cpu_cache_bytes", "FUSED_RESNET_CPU_CACHE_MB", 256 << 20, _parse_mib,
            "fused_resnet.set_cpu_cache_limit(bytes)",
            "freed output blocks the CPU ops keep mapped for reuse, in MiB (0: off; docs/backends.md)"),
)

# (variable, read by, meaning): the environment variables read outside the
# library's own run time.
OTHER_VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("FUSED_RESNET_NO_EXT", "build (setup.py)", "1: install metadata only, no extension (the Makefile then "
                                                "builds it in place)"),
    ("FUSED_RESNET_SKIP_CUDA", "build (setup.py)", "1: build the C++ CPU kernels only"),
    ("FUSED_RESNET_CPU_ARCH", "build (setup.py)", "auto (default), avx2 or generic: the CPU kernels' "
                                                  "instruction set"),
    ("FUSED_RESNET_REAL_NVCC", "build (setup.py -> tools/nvcc_logged.sh)", "the nvcc the logging wrapper "
                                                                          "runs (set by setup.py)"),
    ("FUSED_RESNET_SLOW", "tests", "1: also run the tests on tensors of 2^31 elements (~16 GiB)"),
    ("FUSED_RESNET_FUZZ_EXAMPLES", "tests", "examples per property test (default 25 for ops, 15 for blocks)"),
    ("FUSED_RESNET_FUZZ_TRITON_EXAMPLES", "tests", "examples per property test under the Triton interpreter"),
    ("FUSED_RESNET_BENCH_DEVICE", "benchmarks", "cpu or cuda: the device of `pytest benchmarks/`"),
    ("FUSED_RESNET_BENCH_BATCH", "benchmarks", "batch size of `pytest benchmarks/`"),
    ("FUSED_RESNET_BENCH_IMAGE", "benchmarks", "image size of `pytest benchmarks/`"),
    ("FUSED_RESNET_GIT_COMMIT", "tools (fused-resnet bench, gpu check)", "the commit to record when the "
                                                                         "tree has no .git (the GPU machine)"),
)

_lock = threading.Lock()
_values: dict[str, Any] = {}
_sources: dict[str, str] = {}


def _setting(name: str) -> Setting:
    for s in SETTINGS:
        if s.name == name:
            return s
    raise KeyError(f"fused_resnet.config: no setting {name!r}")


def load_environment(environ=None) -> None:
    """(Re)read every setting from the environment: done once at import."""
    environ = os.environ if environ is None else environ
    with _lock:
        for s in SETTINGS:
            value, source = s.default, "default"
            text = environ.get(s.env)
            if text is not None:
                try:
                    value, source = s.parse(text), f"${s.env}"
                except ValueError as exc:
                    warnings.warn(f"fused_resnet: ignoring ${s.env}={text!r} ({exc}); using the default "
                                  f"{s.default!r}", RuntimeWarning, stacklevel=2)
            _values[s.name] = dict(value) if isinstance(value, dict) else value
            _sources[s.name] = source


def get(name: str) -> Any:
    """The current value of a setting (a copy for dicts)."""
    value = _values[name]
    return dict(value) if isinstance(value, dict) else value


def fusion(name: str) -> bool:
    """One fusion switch (read on every forward: no copy)."""
    return _values["fusions"][name]


def set_value(name: str, value: Any, source: str) -> Any:
    """Set a setting (the public setters validate first); returns the old value."""
    _setting(name)
    with _lock:
        old = _values[name]
        _values[name] = dict(value) if isinstance(value, dict) else value
        _sources[name] = source
    return old


def source(name: str) -> str:
    """Where the current value came from: default, $VARIABLE, or a function."""
    return _sources[name]


# ------------------------------------------------------------ the setters


def set_fusions(**flags: bool) -> dict[str, bool]:
    """Turn individual fusions on or off for every model (for ablations);
    returns the previous settings, so `set_fusions(**old)` restores them.

        old = fused_resnet.set_fusions(shortcut_gemm=False)
        ...  # measure without the fused projection shortcut
        fused_resnet.set_fusions(**old)

    shortcut_gemm (on): in eval on the triton backend, a block's downsample
    (1x1 conv + BN) runs as a second GEMM inside its last conv's kernel.
    prologue (off): in training on the triton backend, every BN + ReLU
    inside a block (not the last, which adds the shortcut) is applied by the
    next conv as it loads its input (ops.conv2d_prologue_bn_act): that
    activation is never written, nor saved; the backward recomputes it.
    prologue_dgrad (on, used only with prologue): a stride-1 prologue conv's
    backward computes its data gradient and the prologue's ReLU + BN
    backward in one Triton kernel."""
    for name, value in flags.items():
        if name not in FUSION_NAMES:
            raise ValueError(f"set_fusions: unknown fusion {name!r}; known: {', '.join(FUSION_NAMES)}")
        if not isinstance(value, bool):
            raise TypeError(f"set_fusions: `{name}` must be True or False, got {value!r}")
    return set_value("fusions", {**_values["fusions"], **flags}, "set_fusions()")


def get_fusions() -> dict[str, bool]:
    """The current fusion switches (a copy)."""
    return get("fusions")


def set_relu_saves(mode: str) -> None:
    """What the fused BN + [add] + ReLU keeps for its backward:

    - "output" (default): nothing new: the ReLU output y itself, which the
      next convolution saves anyway, as eager's ReLU does, so a training step
      holds no more activation memory than eager's; the backward first packs
      the 1-bit mask from y (ops.relu_mask: one read of y);
    - "mask": a 1-bit-per-element mask saved beside y (1/32 more activation
      memory in fp32, 1/16 in fp16/bf16; the backward skips that read)."""
    if mode not in RELU_SAVES:
        raise ValueError(f"fused_resnet.set_relu_saves: mode must be one of {RELU_SAVES}, got {mode!r}")
    set_value("relu_saves", mode, "set_relu_saves()")


def relu_saves() -> str:
    """The current choice (see set_relu_saves)."""
    return _values["relu_saves"]


_UNSET = object()


def set_autotune(enabled: bool | None = None, *, shape_s=_UNSET, run_s=_UNSET, log=_UNSET) -> dict:
    """Triton autotuning: `enabled` (time every candidate config on first
    sight of a shape, cached on disk; False takes the first candidate
    untimed), `shape_s` / `run_s` (seconds one shape / the whole process may
    spend tuning; None: no cap), `log` (a file receiving one JSON line per
    tuned shape; None: none). Returns the previous values."""
    old = {"enabled": _values["autotune"], "shape_s": _values["autotune_shape_s"],
           "run_s": _values["autotune_run_s"], "log": _values["autotune_log"]}
    if enabled is not None:
        if not isinstance(enabled, bool):
            raise TypeError(f"set_autotune: `enabled` must be True or False, got {enabled!r}")
        set_value("autotune", enabled, "set_autotune()")
    for name, value in (("autotune_shape_s", shape_s), ("autotune_run_s", run_s)):
        if value is _UNSET:
            continue
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
            raise ValueError(f"set_autotune: `{name.removeprefix('autotune_')}` must be seconds >= 0 or None, "
                             f"got {value!r}")
        set_value(name, None if value is None else float(value), "set_autotune()")
    if log is not _UNSET:
        set_value("autotune_log", None if log is None else os.fspath(log), "set_autotune()")
    return old


def cache_dir() -> Path:
    return _values["cache_dir"] or _default_cache_dir()


def set_cache_dir(path: str | os.PathLike | None) -> None:
    """Where Triton autotune results are cached (None: the default)."""
    set_value("cache_dir", None if path is None else Path(path), "set_cache_dir()")


def snapshot() -> dict[str, tuple[Any, str]]:
    """Every setting's value and source, for restore()."""
    with _lock:
        return {n: (dict(v) if isinstance(v, dict) else v, _sources[n]) for n, v in _values.items()}


def restore(saved: dict[str, tuple[Any, str]]) -> None:
    """Put back what snapshot() returned."""
    with _lock:
        for name, (value, src) in saved.items():
            _values[name] = dict(value) if isinstance(value, dict) else value
            _sources[name] = src


@contextlib.contextmanager
def override(**values: Any):
    """Set settings for the duration of a `with` block (process-wide, not
    per thread), unvalidated beyond the setting's name:

        with fused_resnet.config.override(fusions={**get_fusions(), "prologue": True}):
            ...
    """
    for name in values:
        _setting(name)
    saved = snapshot()
    try:
        for name, value in values.items():
            set_value(name, value, "config.override()")
        yield
    finally:
        restore(saved)


def _shown(s: Setting, value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={int(v)}" for k, v in value.items())
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(int(value))
    if s.name == "cpu_cache_bytes":
        return f"{value >> 20} MiB"
    return str(value)


def describe() -> list[tuple[str, str, str, str]]:
    """(setting, current value, where it came from, environment variable)
    for every setting, as `fused-resnet info` prints them."""
    return [(s.name, _shown(s, _values[s.name]), _sources[s.name], s.env) for s in SETTINGS]


def markdown_table() -> str:
    """docs/configuration.md's tables."""
    rows = ["| variable | setting | default | change at run time | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        rows.append(f"| `{s.env}` | {s.name} | {_shown(s, s.default)} | `{s.change}` | {s.meaning} |")
    rows += ["", "| variable | read by | meaning |", "|---|---|---|"]
    rows += [f"| `{name}` | {who} | {meaning} |" for name, who, meaning in OTHER_VARIABLES]
    return "\n".join(rows) + "\n"


load_environment()
