// Output tensors of the CPU ops, from a bounded cache of freed blocks.
//
// Why: glibc serves every large block (above its mmap threshold) with a fresh
// mmap and returns it on free, so each call of an op page-faults its outputs
// in again. On the machines we measured, a fault costs about 1.3 us, and the
// faults of a BN backward's two outputs cost more than the kernel itself
// (README, "CPU: the allocator matters"). Blocks kept here stay mapped, the way
// the CUDA caching allocator keeps device memory. Only our ops' outputs use it;
// the process allocator is left alone.
#pragma once

#include <ATen/ATen.h>

namespace fused_resnet {

// An uninitialised CPU tensor of the given sizes, dtype and memory format
// whose storage comes from the cache (small tensors from the default CPU
// allocator). Behaves as at::empty: the storage is resizable, and the profiler
// sees it allocated while a tensor holds it and freed when it returns here.
at::Tensor cached_empty(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat fmt);

}  // namespace fused_resnet
