"""The cuda backend: the CUDA kernels of fused_resnet._C (csrc/cuda: BN
statistics, BN + add + ReLU and its backward, add + ReLU, the ReLU mask;
the ops' "native" entries in dispatch.TABLE) around cuDNN's convolutions,
which aten calls: the default units of backends/units.py."""
