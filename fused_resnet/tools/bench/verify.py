"""`fused-resnet verify`: a fused model against the eager model with the same
weights, both judged against a high-precision (fp64, CPU) copy — block
outputs and logits (train and eval mode), parameter gradients and running
statistics — with the criterion of fused_resnet.numerics. The model is a
fused_resnet builder name or any model fuse() takes (models.py): for a
ResNet the points are the stem and every block (layerN.M), for other models
every top-level child.

The Python entry points are verify() (builds everything from a model name or
a state_dict) and verify_models() (takes the three models, so a test can
hand it a deliberately corrupted fused model).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from ... import numerics

_BLOCK = re.compile(r"^layer\d+\.\d+$")


@dataclass
class Check:
    backend: str
    mode: str  # train | eval
    point: str  # stem, layer1.0, ..., logits, fc
    what: str  # output | grad | running stats
    ok: bool
    max_err: float
    mean_err: float
    eager_err: float
    bound: float
    detail: str = ""  # the worst tensor of a group


@dataclass
class VerifyResult:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def randomize_bn_state(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN affine parameters and running statistics (a freshly
    initialised model has weight 1, bias 0, mean 0, var 1, which would let an
    eval-mode bug in the fold go unseen)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)


def _point_of(name: str) -> str:
    parts = name.split(".")
    if parts[0].startswith("layer") and len(parts) > 1:
        return f"{parts[0]}.{parts[1]}"
    if parts[0] in ("conv1", "bn1"):
        return "stem"
    return parts[0]


def _points(model: nn.Module) -> list[str]:
    """Where outputs are compared: a ResNet's stem and blocks, else every
    top-level child that is not the last one (whose output is the logits)."""
    names = dict(model.named_modules())
    blocks = [n for n in names if _BLOCK.match(n)]
    if blocks:
        return (["stem"] if "maxpool" in names else []) + blocks
    return [n for n, _ in model.named_children()][:-1]


def _capture(model: nn.Module, points: list[str]) -> tuple[dict[str, torch.Tensor], list]:
    """Forward hooks recording each point's output (the stem's: the maxpool's
    input), in the order they run; outputs that are not tensors are skipped."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    mods = dict(model.named_modules())

    def keep(p, out):
        if isinstance(out, torch.Tensor):
            seen[p] = out.detach().clone()

    for p in points:
        if p == "stem":
            handles.append(mods["maxpool"].register_forward_pre_hook(
                lambda m, inp: seen.__setitem__("stem", inp[0].detach().clone())))
        else:
            handles.append(mods[p].register_forward_hook(lambda m, inp, out, p=p: keep(p, out)))
    return seen, handles


def _group(checks: list[tuple[str, numerics.Verdict]], backend, mode, point, what) -> Check:
    # The tensor closest to (or furthest past) its bound speaks for the
    # group: its max error, eager's error and bound are one tensor's figures.
    def ratio(v: numerics.Verdict) -> float:
        if v.bound > 0:
            return v.fused_err / v.bound
        return 0.0 if v.fused_err == 0 else float("inf")

    name, worst = max(checks, key=lambda nv: ratio(nv[1]))
    return Check(backend, mode, point, what, all(v.ok for _, v in checks), worst.fused_err,
                 sum(v.mean_err for _, v in checks) / len(checks), worst.eager_err, worst.bound, detail=name)


def _forward(model, x, train: bool, grad_out):
    """The model's output; in training also its backward of grad_out(shape)."""
    model.train(train)
    out = model(x)
    if train:
        out.backward(grad_out(out.shape).to(out.device, out.dtype))
    return out.detach()


def verify_models(eager: nn.Module, fused: nn.Module, reference: nn.Module, x: torch.Tensor,
                  modes=("train", "eval"), backend: str = "fused", seed: int = 0) -> VerifyResult:
    """Compare `fused` with `eager` (same weights, same dtype/device as x)
    against `reference` (the same weights in fp64 on CPU). The models are
    copied per mode, so the callers' models are left unchanged."""
    dtype = x.dtype
    points = _points(reference)
    checks: list[Check] = []
    for mode in modes:
        train = mode == "train"
        models = [copy.deepcopy(m) for m in (reference, eager, fused)]
        ref_m, eag_m, fus_m = models
        g = torch.Generator().manual_seed(seed + 7)
        drawn: list[torch.Tensor] = []

        def grad_out(shape):  # one gradient for the three models, drawn at the first output's shape
            if not drawn:
                drawn.append(torch.randn(shape, generator=g, dtype=torch.float64))
            return drawn[0]

        captured, outs = [], []
        for m, inp in zip(models, (x.detach().cpu().double(), x, x)):
            seen, handles = _capture(m, points)
            try:
                outs.append(_forward(m, inp, train, grad_out))
            finally:
                for h in handles:
                    h.remove()
            captured.append(seen)
        for p in [q for q in points if all(q in c for c in captured)] + ["logits"]:
            r, e, f = (outs[i] if p == "logits" else captured[i][p] for i in range(3))
            v = numerics.compare(f, e, r, dtype=dtype, kind="output")
            checks.append(Check(backend, mode, p, "output", v.ok, v.fused_err, v.mean_err, v.eager_err, v.bound))
        if not train:
            continue
        by_point: dict[str, list] = {}
        pr, pe, pf = (dict(m.named_parameters()) for m in models)
        for name, rp in pr.items():
            if rp.grad is None:
                continue
            by_point.setdefault(_point_of(name), []).append(name)
        for p, names in by_point.items():
            missing = [n for n in names if pf[n].grad is None]
            if missing:
                inf = float("inf")
                checks.append(Check(backend, mode, p, "grad", False, inf, inf, 0.0, inf, detail=f"no grad: {missing[0]}"))
            elif dtype == torch.float64:
                vs = [(n, numerics.compare(pf[n].grad, pe[n].grad, pr[n].grad, dtype=dtype, kind="grad")) for n in names]
                checks.append(_group(vs, backend, mode, p, "grad"))
            else:
                # Low precision: normwise over the point's gradients (docs/numerics.md):
                # a ReLU input tied with zero within rounding moves one channel's
                # gradient by O(1) in any two correct implementations.
                v = numerics.compare_normwise([pf[n].grad for n in names], [pe[n].grad for n in names],
                                              [pr[n].grad for n in names], dtype=dtype)
                checks.append(Check(backend, mode, p, "grad (normwise)", v.ok, v.fused_err, v.mean_err, v.eager_err,
                                    v.bound))
        by_point = {}
        br, be, bf = (dict(m.named_buffers()) for m in models)
        for name, rb in br.items():
            if name.endswith("num_batches_tracked"):
                same = torch.equal(bf[name].cpu(), rb.cpu())
                v = numerics.Verdict(same, 0.0 if same else float("inf"), 0.0, 0.0, 0.0)
            else:
                v = numerics.compare(bf[name], be[name], rb, dtype=torch.float32, kind="output")
            by_point.setdefault(_point_of(name), []).append((name, v))
        for p, vs in by_point.items():
            checks.append(_group(vs, backend, mode, p, "running stats"))
    return VerifyResult(checks)


def default_backends(device: torch.device) -> tuple[list[str], str | None]:
    """The fused backends that can run on `device`, and a note when none can
    (then the reference path is checked, which says little)."""
    from .providers import FUSED_BACKENDS, fused_provider

    runnable = [b for b in FUSED_BACKENDS if fused_provider(b, device, explicit=False).available]
    if runnable:
        return runnable, None
    return ["reference"], f"no fused backend can run on {device.type} here; checking the reference path only"


def verify(model: str, backends: list[str] | None = None, state_dict: dict | None = None,
           batch_size: int = 4, image_size: int = 64, dtype: torch.dtype = torch.float32,
           device: str = "cpu", modes=("train", "eval"), channels_last: bool = False, seed: int = 0,
           num_classes: int | None = None) -> tuple[VerifyResult, str | None]:
    """Build the eager `model` (models.py) and the fused one with the same
    weights (`state_dict`, else seeded random ones with random BN state) and
    compare them on every backend. Returns the result and a note (or None)."""
    from .models import eager_builder, fused_from

    device_t = torch.device(device)
    notes = []
    if backends is None:
        backends, why = default_backends(device_t)
        notes.append(why)
    if "train" in modes:
        notes.append(numerics.training_conditioning_note(batch_size, image_size))
    note = "; ".join(n for n in notes if n) or None
    if num_classes is None:
        num_classes = state_dict["fc.weight"].shape[0] if state_dict is not None and "fc.weight" in state_dict else 1000
    torch.manual_seed(seed)
    tv = eager_builder(model)(num_classes)
    if state_dict is not None:
        tv.load_state_dict(state_dict)
    else:
        randomize_bn_state(tv, seed)
    pristine = copy.deepcopy(tv)  # fp32 on CPU: what each backend's fused model starts from
    reference = copy.deepcopy(tv).double()
    mf = torch.channels_last if channels_last else torch.contiguous_format
    eager = tv.to(device=device_t, dtype=dtype, memory_format=mf)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device_t, dtype)
    x = x.contiguous(memory_format=mf)
    checks: list[Check] = []
    for b in backends:
        fused = fused_from(model, pristine, b, num_classes)
        fused = fused.to(device=device_t, dtype=dtype, memory_format=mf)
        try:
            checks += verify_models(eager, fused, reference, x, modes=modes, backend=b, seed=seed).checks
        except Exception as exc:  # noqa: BLE001 - a backend that crashes fails verification, the others still run
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            nan = float("nan")
            checks.append(Check(b, "/".join(modes), "model", "error", False, nan, nan, nan, nan, detail=msg))
    return VerifyResult(checks), note


def format_result(result: VerifyResult, verbose: bool = True) -> str:
    cols = ("backend", "mode", "point", "what", "max err", "mean err", "eager err", "bound", "verdict")
    rows = [[c.backend, c.mode, c.point, c.what, f"{c.max_err:.2e}", f"{c.mean_err:.2e}", f"{c.eager_err:.2e}",
             f"{c.bound:.2e}", ("ok" if c.ok else "FAIL") + (f" ({c.detail})" if not c.ok and c.detail else "")]
            for c in result.checks if verbose or not c.ok]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
    n_fail = len(result.failures())
    out.append("")
    out.append(f"{len(result.checks) - n_fail}/{len(result.checks)} checks passed"
               + ("" if n_fail == 0 else f"; {n_fail} FAILED"))
    return "\n".join(out)
