// CUDA kernel of fused_resnet::bn_apply: y = [relu](z * scale + shift [+ r])
// and the 1-bit ReLU mask, in one read and one write per element.
//
// Each thread takes 8 consecutive elements in memory order (one 128-bit load
// of fp16/bf16, two of fp32, four of fp64) and writes their mask byte whole:
// no atomics, no shared bytes. Rounding follows reference.bn_apply: the BN
// output is rounded to z's dtype before the residual add, like eager.
// Torch-free; bn_cuda.cpp does the checks.
#include <type_traits>

#include "bn_device.cuh"

namespace fused_resnet {
namespace {

using namespace bn;

template <typename T, typename O, typename A>
__device__ __forceinline__ O apply_one(T z, A sc, A sh, bool has_r, T r, bool relu) {
  T t = from_acc<T>(add_rn(mul_rn(to_acc<A>(z), sc), sh));
  if (has_r) t = from_acc<T>(add_rn(to_acc<A>(t), to_acc<A>(r)));
  // `v < 0 ? 0 : v` keeps NaN, as torch.relu does.
  if (relu && to_acc<A>(t) < A(0)) t = from_acc<T>(A(0));
  return convert<O>(t);
}

// The min-blocks hint gives ptxas a register budget (64, or 128 for fp64):
// without it ptxas for sm_90 aimed at ~40 and spilled a few bytes.
template <typename T, typename O, int MODE>
__global__ __launch_bounds__(kThreads, sizeof(T) == 8 ? 2 : 4) void apply_kernel(const T* __restrict__ z, const typename AccOf<T>::type* __restrict__ scale,
                                                         const typename AccOf<T>::type* __restrict__ shift,
                                                         const T* __restrict__ residual, O* __restrict__ y,
                                                         uint8_t* __restrict__ mask, int64_t n, int64_t C,
                                                         int64_t inner, bool vec, bool relu) {
  using A = typename AccOf<T>::type;
  const int64_t groups = (n + kGroup - 1) / kGroup;
  const bool has_r = residual != nullptr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t g0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // kRun: the group's first channel, advanced by a fixed step instead of a
  // 64-bit modulo per group.
  int64_t c_run = (g0 * kGroup) % C;
  const int64_t c_step = (stride * kGroup) % C;
  for (int64_t g = g0; g < groups; g += stride) {
    const int64_t i = g * kGroup;
    const int valid = n - i < kGroup ? static_cast<int>(n - i) : kGroup;
    uint32_t bits = 0;
    if (valid == kGroup) {
      const Group<T> zv = load_group(z, i, vec);
      Group<T> rv;
      if (has_r) rv = load_group(residual, i, vec);
      A sc[kGroup], sh[kGroup];
      if (MODE == static_cast<int>(ChannelMode::kRun)) {
        // C % 8 == 0: the group is channels c_run .. c_run + 7.
        const Group<A> s1 = load_group(scale, c_run, true);
        const Group<A> s2 = load_group(shift, c_run, true);
#pragma unroll
        for (int k = 0; k < kGroup; ++k) sc[k] = s1.v[k], sh[k] = s2.v[k];
      } else if (MODE == static_cast<int>(ChannelMode::kSingle)) {
        const int64_t c = (i / inner) % C;
        const A a = scale[c], b = shift[c];
#pragma unroll
        for (int k = 0; k < kGroup; ++k) sc[k] = a, sh[k] = b;
      } else {
        ChannelCursor cur(i, C, inner);
#pragma unroll
        for (int k = 0; k < kGroup; ++k) {
          sc[k] = scale[cur.c];
          sh[k] = shift[cur.c];
          cur.next(C, inner);
        }
      }
      Group<O> yv;
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        yv.v[k] = apply_one<T, O, A>(zv.v[k], sc[k], sh[k], has_r, has_r ? rv.v[k] : T(), relu);
        bits |= static_cast<uint32_t>(to_acc<A>(yv.v[k]) > A(0)) << k;
      }
      store_group(y, i, vec, yv);
    } else {
      // The last, partial group: scalar, unused mask bits stay zero.
      ChannelCursor cur(i, C, inner);
#pragma unroll 1  // runs once per launch; unrolling it only costs registers
      for (int k = 0; k < valid; ++k) {
        const O out = apply_one<T, O, A>(z[i + k], scale[cur.c], shift[cur.c], has_r,
                                         has_r ? residual[i + k] : T(), relu);
        y[i + k] = out;
        bits |= static_cast<uint32_t>(to_acc<A>(out) > A(0)) << k;
        cur.next(C, inner);
      }
    }
    if (relu) mask[g] = static_cast<uint8_t>(bits);
    if (MODE == static_cast<int>(ChannelMode::kRun)) {
      c_run += c_step;
      if (c_run >= C) c_run -= C;
    }
  }
}

template <typename T, typename O, int MODE>
void launch_mode(const void* z, const void* scale, const void* shift, const void* residual, bool relu, void* y,
                 uint8_t* mask, BnShape s, bool vec, int num_sms, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const int64_t n = s.numel();
  const int blocks = grid_size((n + kGroup - 1) / kGroup, kThreads, num_sms);
  apply_kernel<T, O, MODE><<<blocks, kThreads, 0, stream>>>(
      static_cast<const T*>(z), static_cast<const A*>(scale), static_cast<const A*>(shift),
      static_cast<const T*>(residual), static_cast<O*>(y), mask, n, s.channels, s.inner, vec, relu);
}

template <typename T, typename O>
void launch_typed(const void* z, const void* scale, const void* shift, const void* residual, bool relu, void* y,
                  uint8_t* mask, BnShape s, int num_sms, cudaStream_t stream) {
  const bool vec = aligned16(z) && aligned16(y) && (residual == nullptr || aligned16(residual));
  // Mixed input/output dtypes are rare: the general kernel alone serves them.
  if constexpr (std::is_same<T, O>::value) {
    if (s.inner == 1 && s.channels % kGroup == 0 && aligned16(scale) && aligned16(shift)) {
      launch_mode<T, O, static_cast<int>(ChannelMode::kRun)>(z, scale, shift, residual, relu, y, mask, s, vec,
                                                             num_sms, stream);
      return;
    }
    if (s.inner % kGroup == 0) {
      launch_mode<T, O, static_cast<int>(ChannelMode::kSingle)>(z, scale, shift, residual, relu, y, mask, s, vec,
                                                                num_sms, stream);
      return;
    }
  }
  launch_mode<T, O, static_cast<int>(ChannelMode::kWalk)>(z, scale, shift, residual, relu, y, mask, s, vec, num_sms,
                                                          stream);
}

template <typename T>
void launch_out(DType y_dtype, const void* z, const void* scale, const void* shift, const void* residual, bool relu,
                void* y, uint8_t* mask, BnShape s, int num_sms, cudaStream_t stream) {
  switch (y_dtype) {
    case DType::kFloat32: launch_typed<T, float>(z, scale, shift, residual, relu, y, mask, s, num_sms, stream); break;
    case DType::kFloat64: launch_typed<T, double>(z, scale, shift, residual, relu, y, mask, s, num_sms, stream); break;
    case DType::kFloat16: launch_typed<T, __half>(z, scale, shift, residual, relu, y, mask, s, num_sms, stream); break;
    case DType::kBFloat16:
      launch_typed<T, __nv_bfloat16>(z, scale, shift, residual, relu, y, mask, s, num_sms, stream);
      break;
  }
}

}  // namespace

cudaError_t bn_apply_launch(DType z_dtype, DType y_dtype, const void* z, const void* scale, const void* shift,
                            const void* residual, bool relu, void* y, uint8_t* mask, BnShape shape, int num_sms,
                            cudaStream_t stream) {
  if (shape.numel() == 0) return cudaSuccess;
  switch (z_dtype) {
    case DType::kFloat32: launch_out<float>(y_dtype, z, scale, shift, residual, relu, y, mask, shape, num_sms, stream); break;
    case DType::kFloat64: launch_out<double>(y_dtype, z, scale, shift, residual, relu, y, mask, shape, num_sms, stream); break;
    case DType::kFloat16: launch_out<__half>(y_dtype, z, scale, shift, residual, relu, y, mask, shape, num_sms, stream); break;
    case DType::kBFloat16:
      launch_out<__nv_bfloat16>(y_dtype, z, scale, shift, residual, relu, y, mask, shape, num_sms, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace fused_resnet
