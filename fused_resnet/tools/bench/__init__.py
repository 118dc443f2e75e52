"""Benchmarking, verification and roofline analysis behind `fused-resnet
bench | verify | roofline` and `pytest benchmarks/`.

  providers    the compared implementations and how each builds a step
  timing       synchronised timing, percentiles, peak memory
  runner       the side-by-side bench run
  report       table, Markdown, JSON, PNG
  verify       fused vs eager vs fp64 per block
  roofline     per-conv FLOPs / bytes / achieved fraction of peak
  environment  device, versions, git commit of a result
"""
