#!/usr/bin/env bash
# nvcc wrapper used by setup.py (through PYTORCH_NVCC): runs the real nvcc and
# keeps ptxas's resource report (`-Xptxas=-v`: registers, spills, shared
# memory) in <object>.ptxas.log next to the object, where
# tests/build/test_cuda_build.py reads it. Other diagnostics pass through.
set -u
out=""
prev=""
for a in "$@"; do
  if [ "$prev" = "-o" ]; then out="$a"; fi
  prev="$a"
done
nvcc="${FUSED_RESNET_REAL_NVCC:-${CUDA_HOME:-/usr/local/cuda}/bin/nvcc}"
log="${out:-/tmp/fused_resnet_nvcc}.ptxas.log"
err=$(mktemp)
"$nvcc" "$@" 2>"$err"
rc=$?
grep -E "ptxas info|bytes stack frame|Compiling entry function|Function properties" "$err" >"$log" || true
grep -vE "ptxas info|bytes stack frame|Compiling entry function|Function properties" "$err" >&2 || true
rm -f "$err"
exit $rc
