
#include <cooperative_groups.h>
#include <cooperative_groups/reduce.h>
namespace cg = cooperative_groups;

__device__ __forceinline__ float f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float f32(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_f32(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f32(float v) { return __float2half(v); }
template <typename T> struct pair_of;
template <> struct pair_of<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static constexpr unsigned int MAGIC_BITS = 0x43004300u;  // (128.0, 128.0)
  __device__ static type neg_magic() { return __floats2bfloat162_rn(-128.0f, -128.0f); }
  __device__ static type lows(type a, type b) { return __lows2bfloat162(a, b); }
  __device__ static type highs(type a, type b) { return __highs2bfloat162(a, b); }
  __device__ static type zero() { return __floats2bfloat162_rn(0.0f, 0.0f); }
  __device__ static type splat(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }
  __device__ static __nv_bfloat16 lo(type v) { return __low2bfloat16(v); }
  __device__ static __nv_bfloat16 hi(type v) { return __high2bfloat16(v); }
};
template <> struct pair_of<__half> {
  using type = __half2;
  static constexpr unsigned int MAGIC_BITS = 0x64006400u;  // (1024.0, 1024.0)
  __device__ static type neg_magic() { return __floats2half2_rn(-1024.0f, -1024.0f); }
  __device__ static type lows(type a, type b) { return __lows2half2(a, b); }
  __device__ static type highs(type a, type b) { return __highs2half2(a, b); }
  __device__ static type zero() { return __floats2half2_rn(0.0f, 0.0f); }
  __device__ static type splat(__half v) { return __half2half2(v); }
  __device__ static __half lo(type v) { return __low2half(v); }
  __device__ static __half hi(type v) { return __high2half(v); }
};
