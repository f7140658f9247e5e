// The AdEMAMix step, once: plan records, hyperparameters, the per-chunk scalar setup and the
// element-wise math. Compiled by nvcc for the CUDA kernel and by the host compiler for the CPU
// kernel, so both backends run the same code on the same chunk decomposition.
// No torch headers here: the .cu that includes this stays cheap to compile.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#if defined(__CUDACC__)
#define ADEMAMIX_HD __host__ __device__ __forceinline__
#define ADEMAMIX_UNROLL _Pragma("unroll")
#else
#define ADEMAMIX_HD inline
#define ADEMAMIX_UNROLL
#endif

namespace ademamix {

// Which tensor list is which, in the order every interface uses.
constexpr int kParamIdx = 0;
constexpr int kGradIdx = 1;
constexpr int kExpAvgFastIdx = 2;  // m1; absent (null) when beta1 == 0
constexpr int kExpAvgSlowIdx = 3;  // m2
constexpr int kExpAvgSqIdx = 4;    // nu
constexpr int kNumLists = 5;

// A chunk is the work of one CUDA block. 16K elements gives ~22K blocks for 355M params in 292
// uneven tensors (balanced by the block scheduler) and amortises the per-chunk setup.
constexpr int64_t kChunkSize = 16384;
constexpr int kBlockSize = 256;
constexpr int kVecElems = 4;  // elements per vector access: 16 B of fp32 state, 8 B of bf16/fp16
constexpr int kUnroll = 2;    // vector groups per thread whose loads are in flight together
constexpr int kScalarUnroll = 4;  // the same for the scalar path (misaligned views, chunk tails)
constexpr int kNormUnroll = 4;    // vector groups per thread in flight in the gradient norm

// 8-bit states: m1, m2 and nu as uint8 codes with one fp32 absmax per block of kQBlock
// elements (absmax lists in the order m1, m2, nu).
constexpr int kNumAbsmaxLists = 3;

// Per-tensor record of the plan (96 B).
struct TensorRecord {
  void* ptr[kNumLists];  // indexed by k*Idx; ptr[kExpAvgFastIdx] is null when beta1 == 0
  int64_t numel;
  float* step;
  float* absmax[kNumAbsmaxLists];  // 8-bit states only (absmax[0] null when beta1 == 0)
  int32_t vector_ok;  // every pointer aligned to its vector access: the vector path is legal
  int32_t quantized;  // states are 8-bit codes (else the launch's unquantized state dtype)
  int64_t pad;
};
static_assert(sizeof(TensorRecord) == 96, "TensorRecord is 96 bytes");

// One record per CUDA block. An empty tensor still gets one (zero-length) chunk so that its
// step count is incremented like every other.
struct ChunkRecord {
  int32_t tensor;
  int32_t chunk;  // chunk index inside the tensor; element offset = chunk * kChunkSize (64-bit)
};

ADEMAMIX_HD int64_t num_chunks(int64_t numel) {
  return numel == 0 ? 1 : (numel + kChunkSize - 1) / kChunkSize;
}

// Elements of chunk `chunk` of a tensor (0 for the chunk of an empty tensor). Fits in int.
ADEMAMIX_HD int chunk_length(int64_t numel, int64_t chunk) {
  const int64_t left = numel - chunk * kChunkSize;
  return static_cast<int>(left < kChunkSize ? left : kChunkSize);
}

// Per-tensor block counter. Every block of a tensor adds one once it has read the step count;
// the block that brings the counter to a multiple of the tensor's chunk count is the last of
// its launch and writes the new count. The counter only grows (no reset store): if two launches
// with the same plan ever overlap, it still ends at a multiple, and the next launch counts right.
using BlockCounter = unsigned long long;

// The plan of one launch as the blocks see it.
struct LaunchPlan {
  const TensorRecord* tensors;
  const ChunkRecord* chunks;   // one per block
  BlockCounter* counters;      // one per tensor
};

// ---------------------------------------------------------------------------------------------
// Stochastic rounding (bf16 states, and bf16 params with param_sr). The 16 random bits of every
// write come from a counter-based hash of (seed, tensor index in the call, step, element index):
// no thread, block or launch geometry enters, so every backend draws the same bits. The torch
// paths (ademamix_cuda/rounding.py) and Triton implement the same functions.

ADEMAMIX_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

ADEMAMIX_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// A bijective 32-bit hash (two multiply-xorshift rounds). Both multipliers are below 2^31, so
// torch's int64 arithmetic computes it without overflow. U is uint32_t, or (the CPU kernel) a
// compiler vector of uint32_t lanes.
template <class U>
ADEMAMIX_HD U mix32(U x) {
  x ^= x >> 16;
  x = x * 0x21F0AAADu;
  x ^= x >> 15;
  x = x * 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

// The keys of one chunk's random bits: tensor `tensor` of the call, step t (the count after this
// step), elements [e_hi * 2^32, (e_hi + 1) * 2^32) (a chunk never straddles such a boundary).
struct SrKeys {
  uint32_t k0, k1;
};

ADEMAMIX_HD SrKeys sr_keys(uint32_t seed_lo, uint32_t seed_hi, uint32_t tensor, uint32_t t,
                           uint32_t e_hi) {
  const uint32_t tensor_key = mix32(seed_hi ^ mix32(seed_lo ^ mix32(tensor ^ 0x9E3779B9u)));
  const uint32_t step_key = mix32(tensor_key ^ mix32(t));
  SrKeys k;
  k.k0 = mix32(step_key ^ mix32(e_hi));
  k.k1 = mix32(k.k0 ^ 0x85EBCA6Bu);
  return k;
}

// The 64 random bits of element e_lo (the low word of its index): m1 takes r0's low half, m2
// its high half, nu r1's low half and the param (with param_sr) r1's high half.
struct SrBits {
  uint32_t r0, r1;
};

ADEMAMIX_HD SrBits sr_bits(const SrKeys& k, uint32_t e_lo) {
  return SrBits{mix32(e_lo ^ k.k0), mix32(e_lo ^ k.k1)};
}

// fp32 -> bf16 bits, rounded up with probability equal to the dropped fraction (unbiased):
// r (16 random bits) is added below the kept bits. Non-finite values are kept as they are: a
// NaN's payload plus r could carry into the sign and exponent (0x7FFFFFFF + 0xFFFF -> -0.0),
// and a truncated NaN could read as an Inf, so a NaN gets its quiet bit set.
ADEMAMIX_HD uint16_t round_bf16_sr(float x, uint32_t r) {
  const uint32_t b = float_bits(x);
  if ((b & 0x7F800000u) != 0x7F800000u) {
    return static_cast<uint16_t>((b + (r & 0xFFFFu)) >> 16);
  }
  return static_cast<uint16_t>((b >> 16) | ((b & 0x007FFFFFu) != 0 ? 0x0040u : 0u));
}

// bf16 kept as its bits: the storage of bf16 states, and of bf16 params written with SR.
struct Bf16Bits {
  uint16_t bits;
};

// expm1 from +, -, *, / and an exact power-of-two scale only, so that every backend (CUDA, the
// host compilers, Triton compiled and interpreted) computes the same bits; libm's, CUDA's and
// Triton's exp differ in their last bits. One branch-free path (a branch per range cost the CUDA
// kernels registers): x = k ln2 + r with |r| <= 0.35 (ln2 split in two, the first part with few
// bits so that k times it is exact), expm1(r) by its Taylor series to r^9 (truncation below
// 1e-10 relative), then expm1(x) = 2^k expm1(r) + (2^k - 1), both terms exact for k = 0.
// Accurate to a few fp32 ulps for x <= 0, every use here (the bias corrections and the beta3
// warmup); below -30 the result is -1 (x = -inf, for beta2 = 0, included).
ADEMAMIX_HD float expm1_f32(float x) {
  x = fmaxf(x, -30.0f);
  const float k = floorf(x * 0x1.715476p+0f + 0.5f);
  const float r = (x - k * 0x1.63p-1f) - k * -0x1.bd0106p-13f;
  float q = 0x1.71de3ap-19f;  // 1/9!
  q = 0x1.a01a02p-16f + r * q;
  q = 0x1.a01a02p-13f + r * q;
  q = 0x1.6c16c2p-10f + r * q;
  q = 0x1.111112p-7f + r * q;
  q = 0x1.555556p-5f + r * q;
  q = 0x1.555556p-3f + r * q;
  q = 0.5f + r * q;
  const float em1 = r + (r * r) * q;
  const float scale = bits_float(static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23);
  return scale * em1 + (scale - 1.0f);
}

// Hyperparameters as the kernels see them. The host computes every difference and logarithm in
// double and rounds once to float (1 - 0.9999 in fp32 would carry 3e-4 relative error).
struct HyperParams {
  float lr;  // used unless lr comes as a tensor
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float beta3, one_minus_beta3;
  float ln_beta1, ln_beta2;
  // f(b) = ln(0.5) / ln(b + 1e-8) - 1: the half-life map the beta3 warmup interpolates in
  float f_beta1, f_beta3;
  float ln_half;
  float alpha, eps, weight_decay;
  float alpha_warmup, beta3_warmup;  // step counts, valid when the matching has_* is set
  bool has_alpha_warmup, has_beta3_warmup, maximize;
  uint32_t seed_lo, seed_hi;  // of the random bits (used by the variants that round stochastically)
};

// 1-element fp32 tensors read once per chunk; null when absent.
struct ScalarPtrs {
  const float* lr;
  const float* grad_scale;
  const float* found_inf;
};

// kBFloat16Sr: bf16 params written with stochastic rounding (param_sr).
enum class ParamDtype { kFloat32, kBFloat16, kFloat16, kBFloat16Sr };
// The storage of m1, m2 and nu (one dtype for all three) of the tensors with unquantized
// states: bf16 states are written with SR.
enum class StateDtype { kFloat32, kBFloat16 };

// One launch of a kernel over a plan: what the CUDA kernel and the CPU kernels take.
struct LaunchArgs {
  ParamDtype dtype;
  StateDtype state_dtype;
  bool quant;  // some tensors have 8-bit states (TensorRecord::quantized)
  bool has_m1;
  LaunchPlan plan;    // in the memory of the tensors' device
  int64_t n_chunks;   // blocks; a CUDA grid size, <= INT32_MAX (checked by build_plan)
  int64_t n_tensors;  // tensors (and step counts) in the plan
  HyperParams hyper;
  ScalarPtrs scalars;
};

// Everything the element-wise math needs that depends on the step t, computed once per chunk.
struct StepScalars {
  float lr;
  float grad_mult;  // 1/grad_scale, negated when maximizing
  float inv_bc1;    // 1 / (1 - beta1^t)
  float inv_sqrt_bc2;
  float alpha_t;
  float beta3_t, one_minus_beta3_t;
  SrKeys sr;  // the chunk's random-bit keys (variants that round stochastically)
};

// One compile-time variant of the step: what changes the element loop (the storage and whether
// m1 exists). Every variant runs the same functions below. Param and State are storage types:
// Bf16Bits stands for bf16 written with stochastic rounding. Quant: the launch holds tensors
// with 8-bit states, which take the quantized path (State is then the storage of the others).
// The optional scalars (lr tensor, grad_scale, found_inf) are read once per chunk, behind a
// branch every thread takes alike.
template <typename Param, typename State, bool HasM1, bool Quant>
struct Variant {
  using param_t = Param;
  using state_t = State;
  static constexpr bool kRandom = std::is_same<Param, Bf16Bits>::value ||
                                   std::is_same<State, Bf16Bits>::value || Quant;
  static constexpr bool kHasM1 = HasM1;  // false iff beta1 == 0: m1 neither read nor written
  static constexpr bool kQuant = Quant;  // 8-bit codes are written with SR
};

// Calls f(Variant<Param, ...>{}) with the runtime flags turned into template arguments.
template <typename F>
void with_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename Param, typename State, typename F>
void dispatch_variant(bool has_m1, bool quant, F&& f) {
  with_bool(has_m1, [&](auto m1) {
    with_bool(quant, [&](auto q) {
      f(Variant<Param, State, decltype(m1)::value, decltype(q)::value>{});
    });
  });
}

// Calls f(T{}) with T the storage type of param dtype `dtype`: Float, BFloat16 or Half, the
// types of the compiler at hand (CUDA's or the host's). kBFloat16Sr is dispatch_launch's.
template <typename Float, typename BFloat16, typename Half, typename F>
void dispatch_dtype(ParamDtype dtype, F&& f) {
  switch (dtype) {
    case ParamDtype::kFloat32:
      f(Float{});
      break;
    case ParamDtype::kBFloat16:
      f(BFloat16{});
      break;
    case ParamDtype::kFloat16:
      f(Half{});
      break;
    case ParamDtype::kBFloat16Sr:
      break;  // grads and norms never are; launches dispatch it themselves
  }
}

template <typename F>
void dispatch_state(StateDtype dtype, F&& f) {
  if (dtype == StateDtype::kBFloat16) {
    f(Bf16Bits{});
  } else {
    f(float{});
  }
}

// Calls f(Variant<...>{}) for the param and state dtypes of launch `a`.
template <typename Float, typename BFloat16, typename Half, typename F>
void dispatch_launch(const LaunchArgs& a, F&& f) {
  const auto with_param = [&](auto param) {
    dispatch_state(a.state_dtype, [&](auto state) {
      dispatch_variant<decltype(param), decltype(state)>(a.has_m1, a.quant, f);
    });
  };
  if (a.dtype == ParamDtype::kBFloat16Sr) {
    with_param(Bf16Bits{});  // bf16 params written with SR
  } else {
    dispatch_dtype<Float, BFloat16, Half>(a.dtype, with_param);
  }
}

// found_inf nonzero (NaN included) skips the whole step, step counts included.
ADEMAMIX_HD bool skip_step(const ScalarPtrs& d) {
  return d.found_inf != nullptr && *d.found_inf != 0.0f;
}

// The per-chunk scalar setup of chunk `chunk` (its first element's index) of tensor `tensor`
// of the call. t = old step + 1. bc1, bc2 and 1 - beta3_t come from expm1 of an fp32 product of
// host-computed logarithms, which keeps them accurate to a few fp32 ulps.
template <class V>
ADEMAMIX_HD StepScalars step_scalars(const HyperParams& h, const ScalarPtrs& d, float t,
                                     int32_t tensor, int64_t chunk_start) {
  StepScalars s;
  s.lr = d.lr != nullptr ? *d.lr : h.lr;
  const float grad_mult = d.grad_scale != nullptr ? 1.0f / *d.grad_scale : 1.0f;
  s.grad_mult = h.maximize ? -grad_mult : grad_mult;
  if constexpr (V::kHasM1) {
    s.inv_bc1 = 1.0f / -expm1_f32(t * h.ln_beta1);
  } else {
    s.inv_bc1 = 1.0f;
  }
  s.inv_sqrt_bc2 = 1.0f / sqrtf(-expm1_f32(t * h.ln_beta2));
  s.alpha_t = (h.has_alpha_warmup && t < h.alpha_warmup) ? h.alpha * t / h.alpha_warmup : h.alpha;
  if (h.has_beta3_warmup && t < h.beta3_warmup) {
    // beta3_t = 0.5^(1/(x+1)), x interpolating the half-lives of beta1 and beta3.
    const float a = t / h.beta3_warmup;
    const float x = (1.0f - a) * h.f_beta1 + a * h.f_beta3;
    const float ln_beta3_t = h.ln_half / (x + 1.0f);
    s.one_minus_beta3_t = -expm1_f32(ln_beta3_t);
    s.beta3_t = 1.0f - s.one_minus_beta3_t;
  } else {
    s.beta3_t = h.beta3;
    s.one_minus_beta3_t = h.one_minus_beta3;
  }
  if constexpr (V::kRandom) {
    s.sr = sr_keys(h.seed_lo, h.seed_hi, static_cast<uint32_t>(tensor), static_cast<uint32_t>(t),
                   static_cast<uint32_t>(static_cast<uint64_t>(chunk_start) >> 32));
  } else {
    s.sr = SrKeys{0u, 0u};
  }
  return s;
}

// Square roots of the number types the update runs on: float here; the CPU kernel adds its SIMD
// vector type.
template <class F>
struct Sqrt;

template <>
struct Sqrt<float> {
  static ADEMAMIX_HD float of(float x) { return sqrtf(x); }
};

// The element-wise update: the only place the AdEMAMix math exists. All in fp32, on one float
// or (the CPU kernel) a SIMD vector of floats; p is the param before this step (weight decay
// uses it), m1 is untouched when the variant has none.
template <class V, class F>
ADEMAMIX_HD void ademamix_update(F& p, F g, F& m1, F& m2, F& nu, const HyperParams& h,
                                 const StepScalars& s) {
  g = g * F(s.grad_mult);
  F fast = g;  // beta1 == 0: m1 is g itself
  if constexpr (V::kHasM1) {
    m1 = F(h.beta1) * m1 + F(h.one_minus_beta1) * g;
    fast = m1;
  }
  m2 = F(s.beta3_t) * m2 + F(s.one_minus_beta3_t) * g;
  nu = F(h.beta2) * nu + F(h.one_minus_beta2) * g * g;
  const F denom = Sqrt<F>::of(nu) * F(s.inv_sqrt_bc2) + F(h.eps);
  const F update = (fast * F(s.inv_bc1) + F(s.alpha_t) * m2) / denom + F(h.weight_decay) * p;
  p = p - F(s.lr) * update;
}

// Param and state storage <-> fp32. The default serves float and c10::BFloat16 / c10::Half on
// the host (their float constructors round to nearest even); the .cu specialises the CUDA types.
// from_float takes the element's 16 random bits, which only Bf16Bits (SR) reads.
template <typename T>
struct Cast {
  static ADEMAMIX_HD float to_float(T v) { return static_cast<float>(v); }
  static ADEMAMIX_HD T from_float(float v, uint32_t /*random*/) { return static_cast<T>(v); }
};

template <>
struct Cast<Bf16Bits> {
  static ADEMAMIX_HD float to_float(Bf16Bits v) { return bits_float(uint32_t{v.bits} << 16); }
  static ADEMAMIX_HD Bf16Bits from_float(float v, uint32_t random) {
    return Bf16Bits{round_bf16_sr(v, random)};
  }
};

// N consecutive elements moved as one access (16 B for N = 4 fp32).
template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T v[N];
};

// The plan stores plain pointers; telling the compiler they point to global memory lets it use
// LDG/STG (with 128-bit forms) instead of generic loads.
template <typename T>
ADEMAMIX_HD T* assume_global(T* p) {
#if defined(__CUDA_ARCH__)
  __builtin_assume(__isGlobal(p));
#endif
  return p;
}

// The five arrays of one chunk, already offset to the chunk's first element, and the low word
// of that element's index in its tensor (the counter of the random bits).
template <class V>
struct ChunkPtrs {
  using T = typename V::param_t;
  using S = typename V::state_t;
  T* param;
  const T* grad;  // grads of Bf16Bits params are bf16, read as their bits
  S* m1;
  S* m2;
  S* nu;
  uint32_t first_lo;
};

// Updates Unroll groups of N consecutive elements: groups first, first + kBlockSize, ...
// All loads are issued before any math so that they are in flight together; `scalars` is
// called after the loads, so the per-chunk scalar math of a thread's first groups overlaps them.
template <class V, int N, int Unroll, class Scalars>
ADEMAMIX_HD void update_groups(const ChunkPtrs<V>& c, int first, const HyperParams& h,
                               Scalars&& scalars) {
  using T = typename V::param_t;
  using S = typename V::state_t;
  using PackT = Packed<T, N>;
  using PackS = Packed<S, N>;
  PackT p[Unroll], g[Unroll];
  PackS m1[Unroll], m2[Unroll], nu[Unroll];
  ADEMAMIX_UNROLL
  for (int u = 0; u < Unroll; ++u) {
    const int e = (first + u * kBlockSize) * N;
    p[u] = *reinterpret_cast<const PackT*>(c.param + e);
    g[u] = *reinterpret_cast<const PackT*>(c.grad + e);
    if constexpr (V::kHasM1) {
      m1[u] = *reinterpret_cast<const PackS*>(c.m1 + e);
    }
    m2[u] = *reinterpret_cast<const PackS*>(c.m2 + e);
    nu[u] = *reinterpret_cast<const PackS*>(c.nu + e);
  }
  const StepScalars& s = scalars();
  ADEMAMIX_UNROLL
  for (int u = 0; u < Unroll; ++u) {
    const int e = (first + u * kBlockSize) * N;
    ADEMAMIX_UNROLL
    for (int i = 0; i < N; ++i) {
      SrBits r{0u, 0u};
      if constexpr (V::kRandom) {
        r = sr_bits(s.sr, c.first_lo + static_cast<uint32_t>(e + i));
      }
      float pf = Cast<T>::to_float(p[u].v[i]);
      float m1f = 0.0f;
      if constexpr (V::kHasM1) {
        m1f = Cast<S>::to_float(m1[u].v[i]);
      }
      float m2f = Cast<S>::to_float(m2[u].v[i]);
      float nuf = Cast<S>::to_float(nu[u].v[i]);
      ademamix_update<V, float>(pf, Cast<T>::to_float(g[u].v[i]), m1f, m2f, nuf, h, s);
      p[u].v[i] = Cast<T>::from_float(pf, r.r1 >> 16);
      if constexpr (V::kHasM1) {
        m1[u].v[i] = Cast<S>::from_float(m1f, r.r0);
      }
      m2[u].v[i] = Cast<S>::from_float(m2f, r.r0 >> 16);
      nu[u].v[i] = Cast<S>::from_float(nuf, r.r1);
    }
    *reinterpret_cast<PackT*>(c.param + e) = p[u];
    if constexpr (V::kHasM1) {
      *reinterpret_cast<PackS*>(c.m1 + e) = m1[u];
    }
    *reinterpret_cast<PackS*>(c.m2 + e) = m2[u];
    *reinterpret_cast<PackS*>(c.nu + e) = nu[u];
  }
}

// Runs update_groups<V, N, Unroll> over the groups tid, tid + kBlockSize, ... below n_groups,
// then the remaining ones one at a time.
template <class V, int N, int Unroll, class Scalars>
ADEMAMIX_HD void update_strided(const ChunkPtrs<V>& c, int tid, int n_groups,
                                const HyperParams& h, Scalars&& scalars) {
  int group = tid;
  for (; group + (Unroll - 1) * kBlockSize < n_groups; group += Unroll * kBlockSize) {
    update_groups<V, N, Unroll>(c, group, h, scalars);
  }
  for (; group < n_groups; group += kBlockSize) {
    update_groups<V, N, 1>(c, group, h, scalars);
  }
}

// The share of one chunk (of `len` elements) that thread `tid` of a kBlockSize-thread block
// updates. `get_scalars()` gives the chunk's StepScalars; it is called once, after this
// thread's first loads are issued. Offsets inside a chunk fit in int; the chunk's base is 64-bit.
template <class V, class GetScalars>
ADEMAMIX_HD void update_chunk_share(const TensorRecord& rec, int64_t chunk, int len, int tid,
                                    const HyperParams& h, GetScalars&& get_scalars) {
  using T = typename V::param_t;
  using S = typename V::state_t;
  const int64_t start = chunk * kChunkSize;
  ChunkPtrs<V> c;
  c.param = assume_global(static_cast<T*>(rec.ptr[kParamIdx]) + start);
  c.grad = assume_global(static_cast<const T*>(rec.ptr[kGradIdx]) + start);
  c.m1 = V::kHasM1 ? assume_global(static_cast<S*>(rec.ptr[kExpAvgFastIdx]) + start) : nullptr;
  c.m2 = assume_global(static_cast<S*>(rec.ptr[kExpAvgSlowIdx]) + start);
  c.nu = assume_global(static_cast<S*>(rec.ptr[kExpAvgSqIdx]) + start);
  c.first_lo = static_cast<uint32_t>(start);
  StepScalars s;
  bool have_s = false;
  const auto scalars = [&]() -> const StepScalars& {
    if (!have_s) {
      s = get_scalars();
      have_s = true;
    }
    return s;
  };
  int scalar_from = 0;
  if (rec.vector_ok) {
    // A chunk starts at a multiple of kChunkSize elements, so aligned tensors give aligned chunks.
    const int n_groups = len / kVecElems;
    update_strided<V, kVecElems, kUnroll>(c, tid, n_groups, h, scalars);
    scalar_from = n_groups * kVecElems;
  }
  // Misaligned views (odd storage offsets) and the last len % kVecElems elements.
  update_strided<V, 1, kScalarUnroll>(c, scalar_from + tid, len, h, scalars);
}

// The gradient norm's per-chunk partials: the sum of squares (2-norm) or the largest magnitude
// (inf-norm, NaN kept: fmaxf would drop it, and torch's norm returns NaN). Accumulated in fp32.
template <bool Inf>
ADEMAMIX_HD float norm_combine(float acc, float v) {
  if constexpr (Inf) {
    return (v > acc || v != v) ? v : acc;  // a NaN acc stays: no comparison with it is true
  } else {
    return acc + v;
  }
}

template <bool Inf>
ADEMAMIX_HD float norm_term(float x) {
  if constexpr (Inf) {
    return fabsf(x);
  } else {
    return x * x;
  }
}

// ---------------------------------------------------------------------------------------------
// 8-bit blockwise states (ademamix_cuda/quant.py describes the maps). A value is
// absmax[block] * value(code); the maps are float grids with four mantissa bits, so a code's
// value and the code nearest a value come from the fp32 bits: bits = (k + kCodeOne - top) <<
// kCodeShift for magnitude code k >= 1 (top: the code of 1.0). m1 and m2: sign in bit 7 and a
// 7-bit magnitude (top 127); nu: an 8-bit magnitude (top 255). Written with stochastic rounding,
// the random bits of bf16 states (m1: r0's low half, m2: its high half, nu: r1's low half).

constexpr int kQBlock = 256;     // elements per absmax
constexpr int kQLaneElems = 8;   // consecutive elements per lane
constexpr int kQLanes = kQBlock / kQLaneElems;  // 32: one warp per block on CUDA
static_assert(kChunkSize % kQBlock == 0, "a block never straddles two chunks");
constexpr uint32_t kSignedTop = 127u, kUnsignedTop = 255u;
constexpr int kCodeShift = 19;          // the fp32 mantissa bits a code drops
constexpr uint32_t kCodeOne = 127u << 4;  // the bits of 1.0 >> kCodeShift

ADEMAMIX_HD int64_t num_qblocks(int64_t numel) { return (numel + kQBlock - 1) / kQBlock; }

template <uint32_t Top>
ADEMAMIX_HD float magnitude_value(uint32_t k) {
  return k == 0u ? 0.0f : bits_float((k + (kCodeOne - Top)) << kCodeShift);
}

// The magnitude code of a in [0, 1], rounded stochastically with the 16 random bits r: up with
// probability equal to a's fraction of the spacing between its two neighbouring codes. On the
// grid (four mantissa bits) that fraction is the 19 mantissa bits a code drops, so r << 3 added
// below them carries into the kept bits with that probability (bf16 SR's construction). Below
// the smallest magnitude the neighbours are 0 and the smallest: up with probability a / smallest,
// except with KeepNonzero (nu), where every a > 0 gets at least code 1 (a nonzero nu never reads
// back as 0, which would step its element by m / eps). 0 and NaN give 0. Branch-free.
template <uint32_t Top, bool KeepNonzero>
ADEMAMIX_HD uint32_t magnitude_code(float a, uint32_t r) {
  const float smallest = bits_float((1u + (kCodeOne - Top)) << kCodeShift);
  const uint32_t grid = ((float_bits(a) + ((r & 0xFFFFu) << 3)) >> kCodeShift) - (kCodeOne - Top);
  const bool up = KeepNonzero || static_cast<float>(r & 0xFFFFu) < (a / smallest) * 65536.0f;
  const uint32_t below = up ? 1u : 0u;
  return a >= smallest ? grid : (a > 0.0f ? below : 0u);
}

// nu's code (unsigned map).
ADEMAMIX_HD uint32_t unsigned_code(float x, uint32_t r) {
  return magnitude_code<kUnsignedTop, true>(x, r);
}

ADEMAMIX_HD float signed_value(uint32_t c) {
  const float m = magnitude_value<kSignedTop>(c & 127u);
  return (c & 128u) != 0u ? -m : m;
}

// Zero has one code (0): a negative value that rounds to magnitude 0 gets no sign bit.
ADEMAMIX_HD uint32_t signed_code(float x, uint32_t r) {
  const uint32_t m = magnitude_code<kSignedTop, false>(fabsf(x), r);
  return (x < 0.0f && m != 0u) ? (m | 128u) : m;
}

// One 8-bit state of a chunk: codes from the chunk's first element, absmax from its first block.
struct QState {
  uint8_t* code;
  float* absmax;
};

template <class V>
struct QChunk {
  using T = typename V::param_t;
  T* param;
  const T* grad;
  QState m1, m2, nu;  // m1 unused without it
  uint32_t first_lo;  // the low word of the chunk's first element index (param SR bits)
  int len;
  bool vec;  // aligned for the vector path
};

template <class V>
ADEMAMIX_HD QChunk<V> quant_chunk(const TensorRecord& rec, int64_t chunk, int len) {
  using T = typename V::param_t;
  const int64_t start = chunk * kChunkSize;
  const int64_t first_block = start / kQBlock;
  const auto state = [&](int list, int abs) {
    return QState{assume_global(static_cast<uint8_t*>(rec.ptr[list]) + start),
                  assume_global(rec.absmax[abs] + first_block)};
  };
  QChunk<V> c;
  c.param = assume_global(static_cast<T*>(rec.ptr[kParamIdx]) + start);
  c.grad = assume_global(static_cast<const T*>(rec.ptr[kGradIdx]) + start);
  c.m1 = V::kHasM1 ? state(kExpAvgFastIdx, 0) : QState{nullptr, nullptr};
  c.m2 = state(kExpAvgSlowIdx, 1);
  c.nu = state(kExpAvgSqIdx, 2);
  c.first_lo = static_cast<uint32_t>(start);
  c.len = len;
  c.vec = rec.vector_ok != 0;
  return c;
}

// A lane's elements of one block between the update and the requantization: the new fp32
// states and their largest magnitudes (NaN kept).
struct QLaneValues {
  float m1[kQLaneElems], m2[kQLaneElems], nu[kQLaneElems];
  float amax[3];
};

ADEMAMIX_HD int qlane_count(int len, int qblock, int lane) {
  const int n = len - (qblock * kQBlock + lane * kQLaneElems);
  return n < 0 ? 0 : (n > kQLaneElems ? kQLaneElems : n);
}

// Phase one of block `qblock` for lane `lane`: loads, dequantizes, updates and writes the params;
// the new states stay in `out` until the block's absmax is known.
template <class V>
ADEMAMIX_HD void qlane_update(const QChunk<V>& c, int qblock, int lane, const HyperParams& h,
                              const StepScalars& s, QLaneValues& out) {
  using T = typename V::param_t;
  using PackT = Packed<T, kVecElems>;
  using PackC = Packed<uint8_t, kQLaneElems>;
  const int first = qblock * kQBlock + lane * kQLaneElems;
  const int n = qlane_count(c.len, qblock, lane);
  const bool full = c.vec && n == kQLaneElems;
  PackT p[2], g[2];
  PackC c1, c2, c3;
  if (full) {
    ADEMAMIX_UNROLL
    for (int u = 0; u < 2; ++u) {
      p[u] = *reinterpret_cast<const PackT*>(c.param + first + u * kVecElems);
      g[u] = *reinterpret_cast<const PackT*>(c.grad + first + u * kVecElems);
    }
    if constexpr (V::kHasM1) {
      c1 = *reinterpret_cast<const PackC*>(c.m1.code + first);
    }
    c2 = *reinterpret_cast<const PackC*>(c.m2.code + first);
    c3 = *reinterpret_cast<const PackC*>(c.nu.code + first);
  } else {
    // Unrolled with a predicate: constant indices keep the packs in registers.
    ADEMAMIX_UNROLL
    for (int i = 0; i < kQLaneElems; ++i) {
      if (i < n) {
        p[i / kVecElems].v[i % kVecElems] = c.param[first + i];
        g[i / kVecElems].v[i % kVecElems] = c.grad[first + i];
        if constexpr (V::kHasM1) {
          c1.v[i] = c.m1.code[first + i];
        }
        c2.v[i] = c.m2.code[first + i];
        c3.v[i] = c.nu.code[first + i];
      }
    }
  }
  const float a1 = V::kHasM1 ? c.m1.absmax[qblock] : 0.0f;
  const float a2 = c.m2.absmax[qblock];
  const float a3 = c.nu.absmax[qblock];
  out.amax[0] = out.amax[1] = out.amax[2] = 0.0f;
  ADEMAMIX_UNROLL
  for (int i = 0; i < kQLaneElems; ++i) {
    out.m1[i] = out.m2[i] = out.nu[i] = 0.0f;
    if (i < n) {
      SrBits r{0u, 0u};
      if constexpr (V::kRandom) {
        r = sr_bits(s.sr, c.first_lo + static_cast<uint32_t>(first + i));
      }
      T& pv = p[i / kVecElems].v[i % kVecElems];
      float pf = Cast<T>::to_float(pv);
      float m1f = 0.0f;
      if constexpr (V::kHasM1) {
        m1f = signed_value(c1.v[i]) * a1;
      }
      float m2f = signed_value(c2.v[i]) * a2;
      float nuf = magnitude_value<kUnsignedTop>(c3.v[i]) * a3;
      ademamix_update<V, float>(pf, Cast<T>::to_float(g[i / kVecElems].v[i % kVecElems]), m1f,
                                m2f, nuf, h, s);
      pv = Cast<T>::from_float(pf, r.r1 >> 16);
      out.m1[i] = m1f;
      out.m2[i] = m2f;
      out.nu[i] = nuf;
      out.amax[0] = norm_combine<true>(out.amax[0], fabsf(m1f));
      out.amax[1] = norm_combine<true>(out.amax[1], fabsf(m2f));
      out.amax[2] = norm_combine<true>(out.amax[2], fabsf(nuf));
    }
  }
  if (full) {
    ADEMAMIX_UNROLL
    for (int u = 0; u < 2; ++u) {
      *reinterpret_cast<PackT*>(c.param + first + u * kVecElems) = p[u];
    }
  } else {
    ADEMAMIX_UNROLL
    for (int i = 0; i < kQLaneElems; ++i) {
      if (i < n) {
        c.param[first + i] = p[i / kVecElems].v[i % kVecElems];
      }
    }
  }
}

// Phase two: the codes of the lane's new states under the block's new absmax `amax` (m1, m2,
// nu), and (lane 0) the absmax itself. Every lane of the block has finished phase one: the
// old absmax is read there.
template <class V>
ADEMAMIX_HD void qlane_store(const QChunk<V>& c, int qblock, int lane, const StepScalars& s,
                             const QLaneValues& v, const float* amax) {
  using PackC = Packed<uint8_t, kQLaneElems>;
  const int first = qblock * kQBlock + lane * kQLaneElems;
  const int n = qlane_count(c.len, qblock, lane);
  PackC c1, c2, c3;
  ADEMAMIX_UNROLL
  for (int i = 0; i < kQLaneElems; ++i) {
    const SrBits r = sr_bits(s.sr, c.first_lo + static_cast<uint32_t>(first + i));
    if constexpr (V::kHasM1) {
      c1.v[i] = static_cast<uint8_t>(signed_code(v.m1[i] / amax[0], r.r0));
    }
    c2.v[i] = static_cast<uint8_t>(signed_code(v.m2[i] / amax[1], r.r0 >> 16));
    c3.v[i] = static_cast<uint8_t>(unsigned_code(v.nu[i] / amax[2], r.r1));
  }
  if (c.vec && n == kQLaneElems) {
    if constexpr (V::kHasM1) {
      *reinterpret_cast<PackC*>(c.m1.code + first) = c1;
    }
    *reinterpret_cast<PackC*>(c.m2.code + first) = c2;
    *reinterpret_cast<PackC*>(c.nu.code + first) = c3;
  } else {
    ADEMAMIX_UNROLL
    for (int i = 0; i < kQLaneElems; ++i) {
      if (i < n) {
        if constexpr (V::kHasM1) {
          c.m1.code[first + i] = c1.v[i];
        }
        c.m2.code[first + i] = c2.v[i];
        c.nu.code[first + i] = c3.v[i];
      }
    }
  }
  if (lane == 0) {
    if constexpr (V::kHasM1) {
      c.m1.absmax[qblock] = amax[0];
    }
    c.m2.absmax[qblock] = amax[1];
    c.nu.absmax[qblock] = amax[2];
  }
}

// quant_blocks with the lanes taken in turn (the CPU kernels and the GPU stand-in): phase one
// for every lane, the absmax over the lanes, phase two.
template <class Update, class Store>
inline void serial_quant_blocks(int n_qblocks, Update&& update, Store&& store) {
  QLaneValues lanes[kQLanes];
  for (int qb = 0; qb < n_qblocks; ++qb) {
    float amax[3] = {0.0f, 0.0f, 0.0f};
    for (int lane = 0; lane < kQLanes; ++lane) {
      update(qb, lane, lanes[lane]);
      for (int k = 0; k < 3; ++k) {
        amax[k] = norm_combine<true>(amax[k], lanes[lane].amax[k]);
      }
    }
    for (int lane = 0; lane < kQLanes; ++lane) {
      store(qb, lane, lanes[lane], amax);
    }
  }
}

// The lanes of serial_quant_blocks as a Block's quant_blocks (the CPU kernels).
struct SerialLanes {
  template <class Update, class Store>
  void quant_blocks(int n_qblocks, Update&& update, Store&& store) {
    serial_quant_blocks(n_qblocks, update, store);
  }
};

// The whole step of an 8-bit chunk `c` on `b`'s lanes (see step_block).
template <class V, class Block>
ADEMAMIX_HD void update_quant_chunk(const QChunk<V>& c, const HyperParams& h,
                                    const StepScalars& s, Block& b) {
  b.quant_blocks(
      static_cast<int>(num_qblocks(c.len)),
      [&](int qb, int lane, QLaneValues& v) { qlane_update<V>(c, qb, lane, h, s, v); },
      [&](int qb, int lane, const QLaneValues& v, const float* amax) {
        qlane_store<V>(c, qb, lane, s, v, amax);
      });
}

// Thread `tid`'s partial of one chunk of grads (the same walk as update_chunk_share: vector
// groups where the tensor is aligned, then single elements).
template <typename T, bool Inf>
ADEMAMIX_HD float norm_chunk_share(const TensorRecord& rec, int64_t chunk, int len, int tid) {
  const T* const g = assume_global(static_cast<const T*>(rec.ptr[kGradIdx]) + chunk * kChunkSize);
  float acc = 0.0f;
  int from = 0;
  if (rec.vector_ok) {
    // kNormUnroll groups' loads in flight together: the norm only reads.
    using PackT = Packed<T, kVecElems>;
    const int n_groups = len / kVecElems;
    int group = tid;
    for (; group < n_groups; group += kNormUnroll * kBlockSize) {
      PackT v[kNormUnroll];
      ADEMAMIX_UNROLL
      for (int u = 0; u < kNormUnroll; ++u) {
        const int at = group + u * kBlockSize;
        if (at < n_groups) {
          v[u] = *reinterpret_cast<const PackT*>(g + at * kVecElems);
        }
      }
      ADEMAMIX_UNROLL
      for (int u = 0; u < kNormUnroll; ++u) {
        if (group + u * kBlockSize < n_groups) {
          ADEMAMIX_UNROLL
          for (int i = 0; i < kVecElems; ++i) {
            acc = norm_combine<Inf>(acc, norm_term<Inf>(Cast<T>::to_float(v[u].v[i])));
          }
        }
      }
    }
    from = n_groups * kVecElems;
  }
  for (int i = from + tid; i < len; i += kBlockSize) {
    acc = norm_combine<Inf>(acc, norm_term<Inf>(Cast<T>::to_float(g[i])));
  }
  return acc;
}

// Counts this block as done with its tensor's step count: true for the last block of the tensor
// in this launch (see BlockCounter). Tensors of one chunk need no counter.
ADEMAMIX_HD bool is_last_block(BlockCounter* counter, int64_t n_chunks) {
  if (n_chunks == 1) {
    return true;
  }
#if defined(__CUDA_ARCH__)
  __threadfence();  // this block's reads of the step count come before its increment
  const BlockCounter done = atomicAdd(counter, 1ull) + 1ull;
  const bool last = done % static_cast<BlockCounter>(n_chunks) == 0;
  if (last) {
    __threadfence();  // and the last block's write of it after every other block's increment
  }
  return last;
#else
  const BlockCounter done = __atomic_add_fetch(counter, 1ull, __ATOMIC_ACQ_REL);
  return done % static_cast<BlockCounter>(n_chunks) == 0;
#endif
}

// One block of a launch: the whole step of chunk `block` of the plan, step count included.
// `Block` maps the block's threads onto the machine: on CUDA every thread of a real block runs
// this function; the CPU kernel runs it once per block with the threads taken in turn. It
// provides for_each_thread(n_busy, f) (f(tid) for every thread; threads >= n_busy have no
// work), sync() (__syncthreads), leader() (thread 0), scalars(f) (the chunk's StepScalars
// from f, which the CPU computes once per block) and quant_blocks(n, update, store) (the blocks
// of an 8-bit chunk: update(block, lane, values) for every lane, the absmax over the lanes,
// store(block, lane, values, absmax)).
template <class V, class Block>
ADEMAMIX_HD void step_block(const LaunchPlan& plan, int64_t block, const HyperParams& h,
                            const ScalarPtrs& d, Block& b) {
  // The records are loaded before the found_inf test, so the two reads overlap.
  const ChunkRecord chunk = plan.chunks[block];
  const TensorRecord rec = plan.tensors[chunk.tensor];
  if (skip_step(d)) {
    return;  // every block returns: no update, no step increment, counters untouched
  }
  // Every block of a tensor reads the OLD step; the last of them to finish writes old + 1.
  float* const step = assume_global(rec.step);
  const float old_step = *step;
  const int len = chunk_length(rec.numel, chunk.chunk);
  const auto get_scalars = [&] {
    return b.scalars([&] {
      return step_scalars<V>(h, d, old_step + 1.0f, chunk.tensor, chunk.chunk * kChunkSize);
    });
  };
  bool done = false;
  if constexpr (V::kQuant) {
    if (rec.quantized) {
      // One warp (on CUDA) per block of kQBlock elements: the block's absmax is a warp reduction.
      update_quant_chunk<V>(quant_chunk<V>(rec, chunk.chunk, len), h, get_scalars(), b);
      done = true;
    }
  }
  if (!done) {
    b.for_each_thread(len, [&](int tid) {
      update_chunk_share<V>(rec, chunk.chunk, len, tid, h, get_scalars);
    });
  }
  b.sync();  // all threads of this block have read the step
  if (b.leader() && is_last_block(plan.counters + chunk.tensor, num_chunks(rec.numel))) {
    *step = old_step + 1.0f;
  }
}

}  // namespace ademamix
