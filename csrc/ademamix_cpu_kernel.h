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

#include "ademamix.h"

namespace ademamix {

template <>
struct Sqrt<at::vec::Vectorized<float>> {
  static at::vec::Vectorized<float> of(const at::vec::Vectorized<float>& x) { return x.sqrt(); }
};

namespace ADEMAMIX_CPU_ISA {

using FVec = at::vec::Vectorized<float>;

// Param storage <-> fp32 vectors. A group is one Vectorized<T> of params: kVecs float vectors.
template <typename T>
struct Group {  // bfloat16, half: one Vectorized<T> is two float vectors
  static constexpr int kVecs = 2;
  static void load(const T* src, FVec* out) { at::vec::load_to_float<T>(src, out[0], out[1]); }
  static void store(T* dst, const FVec* in) {
    at::vec::convert_from_float<T>(in[0], in[1]).store(dst);  // rounds to nearest even
  }
};

template <>
struct Group<float> {
  static constexpr int kVecs = 1;
  static void load(const float* src, FVec* out) { out[0] = FVec::loadu(src); }
  static void store(float* dst, const FVec* in) { in[0].store(dst); }
};

// One chunk of one tensor, with the chunk's step scalars `s`. Unaligned loads: views at any
// offset take the vector path too; the last len % width elements go one at a time.
template <class V>
void update_chunk(const TensorRecord& rec, int64_t chunk, const HyperParams& h,
                  const StepScalars& s) {
  using T = typename V::param_t;
  using G = Group<T>;
  constexpr int kWidth = G::kVecs * FVec::size();
  const int64_t start = chunk * kChunkSize;
  const int len = chunk_length(rec.numel, chunk);
  T* const p = static_cast<T*>(rec.ptr[kParamIdx]) + start;
  const T* const g = static_cast<const T*>(rec.ptr[kGradIdx]) + start;
  float* const m1 = V::kHasM1 ? static_cast<float*>(rec.ptr[kExpAvgFastIdx]) + start : nullptr;
  float* const m2 = static_cast<float*>(rec.ptr[kExpAvgSlowIdx]) + start;
  float* const nu = static_cast<float*>(rec.ptr[kExpAvgSqIdx]) + start;
  int i = 0;
  for (; i + kWidth <= len; i += kWidth) {
    FVec pv[G::kVecs], gv[G::kVecs];
    G::load(p + i, pv);
    G::load(g + i, gv);
    for (int k = 0; k < G::kVecs; ++k) {
      const int e = i + k * FVec::size();
      FVec m1v(0.0f);
      if constexpr (V::kHasM1) {
        m1v = FVec::loadu(m1 + e);
      }
      FVec m2v = FVec::loadu(m2 + e);
      FVec nuv = FVec::loadu(nu + e);
      ademamix_update<V, FVec>(pv[k], gv[k], m1v, m2v, nuv, h, s);
      if constexpr (V::kHasM1) {
        m1v.store(m1 + e);
      }
      m2v.store(m2 + e);
      nuv.store(nu + e);
    }
    G::store(p + i, pv);
  }
  for (; i < len; ++i) {
    float pf = Cast<T>::to_float(p[i]);
    float m1f = 0.0f;
    if constexpr (V::kHasM1) {
      m1f = m1[i];
    }
    ademamix_update<V, float>(pf, Cast<T>::to_float(g[i]), m1f, m2[i], nu[i], h, s);
    p[i] = Cast<T>::from_float(pf);
    if constexpr (V::kHasM1) {
      m1[i] = m1f;
    }
  }
}

// Every chunk reads its tensor's old step count; the counts move once all chunks are done.
// Chunks are independent, so the result does not depend on the number of threads.
template <class V>
void step_chunks(const LaunchArgs& a) {
  if (skip_step<V>(a.scalars)) {
    return;
  }
  const LaunchPlan& plan = a.plan;
  at::parallel_for(0, a.n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const ChunkRecord chunk = plan.chunks[c];
      const TensorRecord& rec = plan.tensors[chunk.tensor];
      update_chunk<V>(rec, chunk.chunk, a.hyper,
                      step_scalars<V>(a.hyper, a.scalars, *rec.step + 1.0f));
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
