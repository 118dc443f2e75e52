"""Roofline report: per convolution of a model, the FLOPs and the minimum
bytes moved (input, weight and output each touched once — analytic, from the
shapes that forward hooks see), the measured time of that convolution alone,
achieved TFLOP/s and GB/s, and the fraction of the device's peak; plus the
whole network's images/s against the bound the convolutions' roofline sets.

Peaks: the data sheet where we know the GPU (dense tensor-core bf16/fp16),
and always a measured pair (a large matmul, a large copy), which is the only
figure on CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .timing import time_steps

# name substring -> (dense bf16/fp16 FLOP/s, memory bytes/s), from NVIDIA's data sheets.
SPEC_PEAKS = {
    "H100 PCIe": (756e12, 2.0e12),
    "H100 NVL": (835e12, 3.9e12),
    "H100": (989e12, 3.35e12),  # SXM
    "H200": (989e12, 4.8e12),
    "A100": (312e12, 2.0e12),
}


@dataclass
class ConvLayer:
    name: str
    in_shape: tuple
    out_shape: tuple
    kernel: tuple
    stride: tuple
    groups: int
    flops: float
    min_bytes: float
    time_ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    frac_peak_flops: float | None = None
    frac_peak_bw: float | None = None
    bound_ms: float | None = None  # roofline lower bound on time
    limiter: str | None = None  # compute | memory


def conv_layers(model: nn.Module, x: torch.Tensor) -> list[tuple[ConvLayer, nn.Conv2d, torch.Tensor]]:
    """Every Conv2d that runs in model(x), with its FLOPs, minimum bytes and
    one recorded input."""
    found = []
    elem = x.element_size()

    def hook(name):
        def fn(m: nn.Conv2d, inp, out):
            xi = inp[0]
            n, cin, _, _ = xi.shape
            _, cout, ho, wo = out.shape
            kh, kw = m.kernel_size
            flops = 2.0 * n * cout * ho * wo * (cin // m.groups) * kh * kw
            nbytes = float(elem * (xi.numel() + m.weight.numel() + out.numel()))
            found.append((ConvLayer(name, tuple(xi.shape), tuple(out.shape), (kh, kw), tuple(m.stride), m.groups,
                                    flops, nbytes), m, xi.detach()))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return found


def measured_peaks(device, dtype) -> dict:
    """A large matmul (FLOP/s) and a large copy (bytes/s), best of a few."""
    device = torch.device(device)
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_steps(lambda: a @ b, device, steps=10, warmup=2)
    flops = 2.0 * n ** 3 / min(t.times_s)
    numel = (256 if device.type == "cuda" else 32) * 2**20
    src = torch.empty(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = time_steps(lambda: dst.copy_(src), device, steps=10, warmup=2)
    bw = 2.0 * src.numel() * src.element_size() / min(t.times_s)
    return {"flops": flops, "bytes_per_s": bw, "how": f"{n}x{n} matmul in {dtype}, {numel * 4 >> 20} MiB fp32 copy"}


def device_peaks(device, dtype) -> dict:
    device = torch.device(device)
    out = {"measured": measured_peaks(device, dtype), "spec": None}
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, (f, bw) in SPEC_PEAKS.items():
            if key in name:
                out["spec"] = {"flops": f, "bytes_per_s": bw, "source": f"data sheet ({key}, dense)"}
                break
    return out


def roofline(model_name: str, batch_size: int, image_size: int, dtype: torch.dtype, device: str,
             channels_last: bool = True, steps: int = 5, warmup: int = 1,
             network_images_per_s: dict[str, float] | None = None) -> dict:
    """The report as a dict (see format_roofline). network_images_per_s:
    measured whole-network figures (e.g. from the bench) to set against the
    bound; the eager inference figure is measured here when absent."""
    from .models import eager_builder

    device_t = torch.device(device)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = eager_builder(model_name)(1000).to(device_t, dtype).eval().to(memory_format=mf)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device_t).to(dtype).contiguous(memory_format=mf)
    peaks = device_peaks(device_t, dtype)
    use = peaks["spec"] or peaks["measured"]
    layers = []
    for layer, mod, xi in conv_layers(model, x):
        with torch.no_grad():
            t = time_steps(lambda: mod(xi), device_t, steps=steps, warmup=warmup)
        s = t.median_s
        layer.time_ms = s * 1e3
        layer.tflops = layer.flops / s / 1e12
        layer.gbps = layer.min_bytes / s / 1e9
        layer.frac_peak_flops = layer.flops / s / use["flops"]
        layer.frac_peak_bw = layer.min_bytes / s / use["bytes_per_s"]
        tc, tm = layer.flops / use["flops"], layer.min_bytes / use["bytes_per_s"]
        layer.bound_ms = max(tc, tm) * 1e3
        layer.limiter = "compute" if tc >= tm else "memory"
        layers.append(layer)
    bound_s = sum(layer.bound_ms for layer in layers) / 1e3
    conv_s = sum(layer.time_ms for layer in layers) / 1e3
    network = dict(network_images_per_s or {})
    if not network:
        with torch.no_grad():
            t = time_steps(lambda: model(x), device_t, steps=steps, warmup=warmup)
        network["eager inference (measured here)"] = batch_size / t.median_s
    return {
        "model": model_name, "batch_size": batch_size, "image_size": image_size, "dtype": str(dtype).replace("torch.", ""),
        "device": str(device_t), "peaks": peaks, "peaks_used": "spec" if peaks["spec"] else "measured",
        "layers": [asdict(layer) for layer in layers],
        "total_flops": sum(layer.flops for layer in layers),
        "total_min_bytes": sum(layer.min_bytes for layer in layers),
        "conv_time_ms": conv_s * 1e3,
        "bound_images_per_s": batch_size / bound_s,
        "convs_alone_images_per_s": batch_size / conv_s,
        "network_images_per_s": network,
    }


def format_roofline(r: dict) -> str:
    use = r["peaks"]["spec"] or r["peaks"]["measured"]
    m = r["peaks"]["measured"]
    lines = [
        f"Roofline: {r['model']}, batch {r['batch_size']}, {r['image_size']}x{r['image_size']}, {r['dtype']}, {r['device']}",
        f"peaks used ({r['peaks_used']}): {use['flops'] / 1e12:.2f} TFLOP/s, {use['bytes_per_s'] / 1e9:.1f} GB/s; "
        f"measured: {m['flops'] / 1e12:.2f} TFLOP/s, {m['bytes_per_s'] / 1e9:.1f} GB/s ({m['how']})",
        "",
    ]
    cols = ("conv", "in shape", "k/s/g", "GFLOP", "MB", "ms", "TFLOP/s", "GB/s", "%peak F", "%peak B", "bound")
    rows = []
    for L in r["layers"]:
        rows.append([L["name"], "x".join(map(str, L["in_shape"])),
                     f"{L['kernel'][0]}x{L['kernel'][1]}/{L['stride'][0]}/{L['groups']}",
                     f"{L['flops'] / 1e9:.2f}", f"{L['min_bytes'] / 1e6:.1f}", f"{L['time_ms']:.3f}",
                     f"{L['tflops']:.3f}", f"{L['gbps']:.1f}", f"{100 * L['frac_peak_flops']:.1f}",
                     f"{100 * L['frac_peak_bw']:.1f}", L["limiter"]])
    widths = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(cols)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines += [fmt(cols), fmt(["-" * w for w in widths])] + [fmt(x) for x in rows]
    lines += [
        "",
        f"convolutions: {r['total_flops'] / 1e9:.1f} GFLOP, {r['total_min_bytes'] / 1e6:.0f} MB minimum traffic, "
        f"{r['conv_time_ms']:.1f} ms measured one by one",
        f"roofline bound (convolutions only): {r['bound_images_per_s']:.1f} images/s; "
        f"convolutions alone as measured: {r['convs_alone_images_per_s']:.1f} images/s",
    ]
    if any(L["frac_peak_flops"] > 1 or L["frac_peak_bw"] > 1 for L in r["layers"]):
        lines.append("note: some layers exceed 100% of the peak: the peak measurement was disturbed (a busy "
                     "machine, or a copy slower than the caches these small layers fit in)")
    for k, v in r["network_images_per_s"].items():
        lines.append(f"network {k}: {v:.1f} images/s = {100 * v / r['bound_images_per_s']:.1f}% of the bound")
    return "\n".join(lines)
