"""Build of fused_resnet and its native extension fused_resnet._C.

C++ sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built. The CUDA part
(csrc/cuda/*) is built whenever torch is a CUDA build and nvcc is found, GPU
or not; FUSED_RESNET_SKIP_CUDA=1 skips it. Code is generated for sm_80 and
sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise. ptxas's resource report of
every CUDA object lands next to it as <object>.ptxas.log (tools/nvcc_logged.sh).
"""

import glob
import os
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; a /usr/local/bin/nvcc symlink
    makes that /usr/local. Follow the link to the real toolkit instead."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import shutil

    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    # /usr/local/bin/nvcc may be a shell script, not a link: try the usual home too.
    for home in candidates + ["/usr/local/cuda"]:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            os.environ["CUDA_HOME"] = home
            return


_find_cuda_home()  # before torch.utils.cpp_extension reads it
DEFAULT_ARCHS = "8.0;9.0"


def _cpu_flags():
    flags = ["-O3", "-fopenmp", "-Wno-unused-function"]
    # at::vec::Vectorized picks its instruction set from CPU_CAPABILITY_*; the
    # extension is built on the machine that runs it (CI, the GPU box), so
    # use AVX2 + FMA when this machine has them.
    want = os.environ.get("FUSED_RESNET_CPU_ARCH", "auto")
    cpuinfo = ""
    if want == "auto" and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    if want == "avx2" or (want == "auto" and " avx2" in cpuinfo and " fma" in cpuinfo):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def _cuda_include_dirs():
    """Library headers (cublas_v2.h, cusparse.h, ...) that torch's CUDA
    headers include: pip's nvidia-* packages hold them, the toolkit may not."""
    roots = list(sys.path) + site.getsitepackages()
    found = []
    for r in roots:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for d in sorted(glob.glob(os.path.join(r, pattern))):
                if d not in found and os.path.isdir(d):
                    found.append(d)
    return found


def _nvrtc_link_args(libdirs):
    """Linker arguments for NVRTC, which the cuDNN frontend's headers call
    directly. torch's libtorch_cuda loads it on some releases (2.14) and not
    on others (2.11), so the extension names it itself: the soname of the
    CUDA major torch was built with, from pip's nvidia-* packages or the
    toolkit, with an rpath to where it was found."""
    import torch
    from torch.utils import cpp_extension as ce

    soname = f"libnvrtc.so.{torch.version.cuda.split('.')[0]}"
    for d in libdirs + [os.path.join(ce.CUDA_HOME, "lib64"), os.path.join(ce.CUDA_HOME, "lib")]:
        if os.path.exists(os.path.join(d, soname)):
            return [f"-L{d}", f"-l:{soname}", f"-Wl,-rpath,{d}"]
    raise RuntimeError(f"fused_resnet: the cudnn backend needs NVRTC ({soname}), found in none of "
                       f"{libdirs} or {ce.CUDA_HOME}/lib64; pip install nvidia-cuda-nvrtc")


def _cuda_reason_unavailable():
    import torch
    from torch.utils import cpp_extension as ce

    if os.environ.get("FUSED_RESNET_SKIP_CUDA", "0") == "1":
        return "FUSED_RESNET_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    if ce.CUDA_HOME is None or not os.path.exists(os.path.join(ce.CUDA_HOME, "bin", "nvcc")):
        return "nvcc not found (set CUDA_HOME)"
    return None


def _extensions():
    from torch.utils import cpp_extension as ce

    rel = lambda paths: [os.path.relpath(p, ROOT) for p in paths]  # noqa: E731
    sources = rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))))
    sources += rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))))
    cxx = _cpu_flags()
    reason = _cuda_reason_unavailable()
    if reason is not None:
        print(f"fused_resnet: building the CPU extension only ({reason})")
        return [ce.CppExtension("fused_resnet._C", sources, extra_compile_args={"cxx": cxx},
                                extra_link_args=["-fopenmp"], py_limited_api=False)]

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    os.environ["FUSED_RESNET_REAL_NVCC"] = os.path.join(ce.CUDA_HOME, "bin", "nvcc")
    os.environ.setdefault("PYTORCH_NVCC", os.path.join(ROOT, "tools", "nvcc_logged.sh"))
    sources += rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))))
    sources += rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))))
    includes = _cuda_include_dirs()
    libdirs = [os.path.join(os.path.dirname(d), "lib") for d in includes]
    libdirs = [d for d in libdirs if os.path.isdir(d)]
    # -isystem, not -I: searched after the toolkit's own include/, so the
    # toolkit's cuda_runtime.h (with its crt/) wins over the pip copy.
    system_includes = [flag for d in includes for flag in ("-isystem", d)]
    # The cudnn backend (csrc/cudnn/) only where the cuDNN frontend's headers
    # are found (pip's nvidia-cudnn-frontend puts them in site-packages/include).
    fe_dirs = [os.environ.get("CUDNN_FRONTEND_INCLUDE", "")]
    fe_dirs += [os.path.join(r, "include") for r in site.getsitepackages() + list(sys.path) if r]
    fe_dirs = [d for d in fe_dirs if d and os.path.exists(os.path.join(d, "cudnn_frontend.h"))]
    link = ["-fopenmp"]
    if fe_dirs:
        sources += rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "cudnn", "*.cpp"))))
        cxx = cxx + ["-isystem", fe_dirs[0]]
        link += _nvrtc_link_args(libdirs)
        print(f"fused_resnet: building the cudnn backend against {fe_dirs[0]}")
    else:
        print("fused_resnet: not building the cudnn backend (cudnn_frontend.h not found: "
              "pip install nvidia-cudnn-frontend, or set CUDNN_FRONTEND_INCLUDE)")
    print(f"fused_resnet: building CPU + CUDA for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    return [ce.CUDAExtension(
        "fused_resnet._C", sources,
        library_dirs=libdirs,
        extra_compile_args={
            "cxx": cxx + system_includes,
            "nvcc": system_includes + ["-O3", "-Xptxas=-v", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++17"],
        },
        extra_link_args=link,
    )]


def main():
    if os.environ.get("FUSED_RESNET_NO_EXT") == "1":
        # The Makefile installs metadata with pip, then builds in place.
        setup()
        return
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
