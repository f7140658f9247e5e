// The op's fast CPU kernel: the whole step in one pass over a plan's chunks, threads through
// at::parallel_for over the chunks, SIMD through ATen's Vectorized. The element math is
// ademamix_update, the template the CUDA kernel runs, here on Vectorized<float>.
//
// Compiled once per instruction set: in _C for the baseline, and in the _cpu_avx2 module with
// AVX2 and FMA (ATen's Vectorized follows the CPU_CAPABILITY_* macros). ADEMAMIX_CPU_ISA names
// the namespace of each build, so the two never share a symbol.
#pragma once

#ifndef ADEMAMIX_CPU_ISA
#error "define ADEMAMIX_CPU_ISA (the namespace of this build) before including this header"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <string.h>

#include <type_traits>

#include "ademamix.h"

namespace ademamix {

template <>
struct Sqrt<at::vec::Vectorized<float>> {
  static at::vec::Vectorized<float> of(const at::vec::Vectorized<float>& x) { return x.sqrt(); }
};

namespace ADEMAMIX_CPU_ISA {

using FVec = at::vec::Vectorized<float>;

// Integer lanes as wide as FVec (GCC/Clang vector extensions; the compiler picks the
// instructions of the build): the random bits and the bf16 bit work of stochastic rounding.
constexpr int kLanes = FVec::size();
typedef uint32_t U32V __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t U16V __attribute__((vector_size(kLanes * sizeof(uint16_t))));

inline U32V lane_index() {
  U32V v;
  for (int l = 0; l < kLanes; ++l) {
    v[l] = static_cast<uint32_t>(l);
  }
  return v;
}

// sr_bits for the kLanes consecutive elements from e_lo.
inline void sr_bits_vec(const SrKeys& k, uint32_t e_lo, U32V& r0, U32V& r1) {
  const U32V e = lane_index() + e_lo;
  r0 = mix32(e ^ k.k0);
  r1 = mix32(e ^ k.k1);
}

inline U32V bits_of(const FVec& v) {
  float f[kLanes];
  v.store(f);
  U32V u;
  memcpy(&u, f, sizeof(u));
  return u;
}

inline FVec float_of(const U32V& u) {
  float f[kLanes];
  memcpy(f, &u, sizeof(f));
  return FVec::loadu(f);
}

// round_bf16_sr on every lane (the same bits: finite values get r's low 16 bits added, NaN its
// quiet bit, Inf is kept).
inline U16V round_bf16_sr_vec(const FVec& x, const U32V& r) {
  const U32V b = bits_of(x);
  const U32V finite = (U32V)((b & 0x7F800000u) != 0x7F800000u);  // all ones where finite
  const U32V nan_bit = (U32V)((b & 0x007FFFFFu) != 0u) & 0x0040u;
  const U32V rounded = (b + (r & 0xFFFFu)) >> 16;
  const U32V kept = (b >> 16) | nan_bit;
  return __builtin_convertvector((rounded & finite) | (kept & ~finite), U16V);
}

inline FVec load_bf16_bits(const Bf16Bits* src) {
  U16V h;
  memcpy(&h, src, sizeof(h));
  return float_of(__builtin_convertvector(h, U32V) << 16);
}

inline void store_bf16_sr(Bf16Bits* dst, const FVec& v, const U32V& random) {
  const U16V h = round_bf16_sr_vec(v, random);
  memcpy(dst, &h, sizeof(h));
}

// Param storage <-> fp32 vectors. A group is one Vectorized<T> of params: kVecs float vectors.
// store() takes the random words of the group's vectors and the shift of the param's 16 bits in
// them (read by Bf16Bits only: bf16 with SR).
template <typename T>
struct Group {  // bfloat16, half: one Vectorized<T> is two float vectors
  static constexpr int kVecs = 2;
  static void load(const T* src, FVec* out) { at::vec::load_to_float<T>(src, out[0], out[1]); }
  static void store(T* dst, const FVec* in, const U32V* /*random*/, int /*shift*/) {
    at::vec::convert_from_float<T>(in[0], in[1]).store(dst);  // rounds to nearest even
  }
};

template <>
struct Group<float> {
  static constexpr int kVecs = 1;
  static void load(const float* src, FVec* out) { out[0] = FVec::loadu(src); }
  static void store(float* dst, const FVec* in, const U32V*, int) { in[0].store(dst); }
};

// bf16 as bits (bf16 states; bf16 params with SR).
template <int kVecs_>
struct Bf16Group {
  static constexpr int kVecs = kVecs_;
  static void load(const Bf16Bits* src, FVec* out) {
    for (int k = 0; k < kVecs; ++k) {
      out[k] = load_bf16_bits(src + k * kLanes);
    }
  }
  static void store(Bf16Bits* dst, const FVec* in, const U32V* random, int shift) {
    for (int k = 0; k < kVecs; ++k) {
      store_bf16_sr(dst + k * kLanes, in[k], random[k] >> shift);
    }
  }
};

template <>
struct Group<Bf16Bits> : Bf16Group<2> {};

// One float vector of a state.
template <typename S>
using StateVec = std::conditional_t<std::is_same<S, Bf16Bits>::value, Bf16Group<1>, Group<float>>;

// One chunk of one tensor, with the chunk's step scalars `s`. Unaligned loads: views at any
// offset take the vector path too; the last len % width elements go one at a time. The random
// words of element e are sr_bits(s.sr, low word of its index), as in every backend.
template <class V>
void update_chunk(const TensorRecord& rec, int64_t chunk, const HyperParams& h,
                  const StepScalars& s) {
  using T = typename V::param_t;
  using S = typename V::state_t;
  using G = Group<T>;
  using SV = StateVec<S>;
  constexpr int kWidth = G::kVecs * kLanes;
  const int64_t start = chunk * kChunkSize;
  const uint32_t first_lo = static_cast<uint32_t>(start);
  const int len = chunk_length(rec.numel, chunk);
  T* const p = static_cast<T*>(rec.ptr[kParamIdx]) + start;
  const T* const g = static_cast<const T*>(rec.ptr[kGradIdx]) + start;
  S* const m1 = V::kHasM1 ? static_cast<S*>(rec.ptr[kExpAvgFastIdx]) + start : nullptr;
  S* const m2 = static_cast<S*>(rec.ptr[kExpAvgSlowIdx]) + start;
  S* const nu = static_cast<S*>(rec.ptr[kExpAvgSqIdx]) + start;
  int i = 0;
  for (; i + kWidth <= len; i += kWidth) {
    U32V r0[G::kVecs], r1[G::kVecs];
    if constexpr (V::kRandom) {
      for (int k = 0; k < G::kVecs; ++k) {
        sr_bits_vec(s.sr, first_lo + static_cast<uint32_t>(i + k * kLanes), r0[k], r1[k]);
      }
    }
    FVec pv[G::kVecs], gv[G::kVecs];
    G::load(p + i, pv);
    G::load(g + i, gv);
    for (int k = 0; k < G::kVecs; ++k) {
      const int e = i + k * kLanes;
      FVec m1v(0.0f);
      if constexpr (V::kHasM1) {
        SV::load(m1 + e, &m1v);
      }
      FVec m2v, nuv;
      SV::load(m2 + e, &m2v);
      SV::load(nu + e, &nuv);
      ademamix_update<V, FVec>(pv[k], gv[k], m1v, m2v, nuv, h, s);
      if constexpr (V::kHasM1) {
        SV::store(m1 + e, &m1v, &r0[k], 0);
      }
      SV::store(m2 + e, &m2v, &r0[k], 16);
      SV::store(nu + e, &nuv, &r1[k], 0);
    }
    G::store(p + i, pv, r1, 16);
  }
  for (; i < len; ++i) {
    SrBits r{0u, 0u};
    if constexpr (V::kRandom) {
      r = sr_bits(s.sr, first_lo + static_cast<uint32_t>(i));
    }
    float pf = Cast<T>::to_float(p[i]);
    float m1f = 0.0f;
    if constexpr (V::kHasM1) {
      m1f = Cast<S>::to_float(m1[i]);
    }
    float m2f = Cast<S>::to_float(m2[i]);
    float nuf = Cast<S>::to_float(nu[i]);
    ademamix_update<V, float>(pf, Cast<T>::to_float(g[i]), m1f, m2f, nuf, h, s);
    p[i] = Cast<T>::from_float(pf, r.r1 >> 16);
    if constexpr (V::kHasM1) {
      m1[i] = Cast<S>::from_float(m1f, r.r0);
    }
    m2[i] = Cast<S>::from_float(m2f, r.r0 >> 16);
    nu[i] = Cast<S>::from_float(nuf, r.r1);
  }
}

// Every chunk reads its tensor's old step count; the counts move once all chunks are done.
// Chunks are independent, so the result does not depend on the number of threads.
template <class V>
void step_chunks(const LaunchArgs& a) {
  if (skip_step(a.scalars)) {
    return;
  }
  const LaunchPlan& plan = a.plan;
  at::parallel_for(0, a.n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const ChunkRecord chunk = plan.chunks[c];
      const TensorRecord& rec = plan.tensors[chunk.tensor];
      const StepScalars s = step_scalars<V>(a.hyper, a.scalars, *rec.step + 1.0f, chunk.tensor,
                                            chunk.chunk * kChunkSize);
      if constexpr (V::kQuant) {
        if (rec.quantized) {
          SerialLanes lanes;
          update_quant_chunk<V>(quant_chunk<V>(rec, chunk.chunk, chunk_length(rec.numel, chunk.chunk)),
                                a.hyper, s, lanes);
          continue;
        }
      }
      update_chunk<V>(rec, chunk.chunk, a.hyper, s);
    }
  });
  for (int64_t t = 0; t < a.n_tensors; ++t) {
    *plan.tensors[t].step += 1.0f;
  }
}

// The launch `a` (CPU tensors) on this build's instruction set.
inline void run_cpu_launch(const LaunchArgs& a) {
  dispatch_launch<float, c10::BFloat16, c10::Half>(
      a, [&](auto variant) { step_chunks<decltype(variant)>(a); });
}

// One chunk's partial of the gradient norm (see norm_combine): vector lanes, then the lanes
// and the tail in order.
template <typename T, bool Inf>
float norm_chunk(const TensorRecord& rec, int64_t chunk) {
  using G = Group<T>;
  constexpr int kWidth = G::kVecs * FVec::size();
  const int len = chunk_length(rec.numel, chunk);
  const T* const g = static_cast<const T*>(rec.ptr[kGradIdx]) + chunk * kChunkSize;
  // kAcc independent accumulators: one would wait on its own add at every vector.
  constexpr int kAcc = 4;
  FVec acc[kAcc];
  for (int a = 0; a < kAcc; ++a) {
    acc[a] = FVec(0.0f);
  }
  const auto add = [&](int a, int at) {
    FVec v[G::kVecs];
    G::load(g + at, v);
    for (int k = 0; k < G::kVecs; ++k) {
      if constexpr (Inf) {
        acc[a] = at::vec::maximum(acc[a], v[k].abs());  // keeps NaN
      } else {
        acc[a] = acc[a] + v[k] * v[k];
      }
    }
  };
  int i = 0;
  for (; i + kAcc * kWidth <= len; i += kAcc * kWidth) {
    for (int a = 0; a < kAcc; ++a) {  // constant bounds: the accumulators stay in registers
      add(a, i + a * kWidth);
    }
  }
  for (; i + kWidth <= len; i += kWidth) {
    add(0, i);
  }
  float out = 0.0f;
  for (int a = 0; a < kAcc; ++a) {
    float lanes[FVec::size()];
    acc[a].store(lanes);
    for (int lane = 0; lane < FVec::size(); ++lane) {
      out = norm_combine<Inf>(out, lanes[lane]);
    }
  }
  for (; i < len; ++i) {
    out = norm_combine<Inf>(out, norm_term<Inf>(Cast<T>::to_float(g[i])));
  }
  return out;
}

// The gradient norm's partials of the norm plan launch `a` into `partials`, one per chunk; the
// same bits whatever the number of threads.
inline void run_cpu_norm(const LaunchArgs& a, bool inf_norm, float* partials) {
  dispatch_dtype<float, c10::BFloat16, c10::Half>(a.dtype, [&](auto param) {
    with_bool(inf_norm, [&](auto inf) {
      at::parallel_for(0, a.n_chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          const ChunkRecord chunk = a.plan.chunks[c];
          partials[c] = norm_chunk<decltype(param), decltype(inf)::value>(
              a.plan.tensors[chunk.tensor], chunk.chunk);
        }
      });
    });
  });
}

}  // namespace ADEMAMIX_CPU_ISA
}  // namespace ademamix
