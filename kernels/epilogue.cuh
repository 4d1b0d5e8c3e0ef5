// epilogue.cuh: the math of optcc's fused epilogue, shared by every kernel family.
//
// One functor computes, per output element (all in fp32):
//   v = acc * alpha + bias; [v += residual]; v = act(v); [v += residual]; out = v * out_scale
// Its runtime knobs (activation, residual placement, clip bounds, output scale) are kernel
// arguments, not template parameters, so one compiled kernel serves every epilogue the
// graph can ask for; only the element types and the tile shape are compiled in.
#pragma once

#include <cmath>

#include "cutlass/array.h"
#include "cutlass/cutlass.h"

#include "optcc_kernels.h"

namespace optcc {

struct EpilogueParams {
  int activation = OPTCC_ACT_NONE;
  int residual_after_activation = 0;
  float clip_min = 0.f;
  float clip_max = 0.f;
  float out_scale = 1.f;
};

CUTLASS_HOST_DEVICE float activate(float v, EpilogueParams const& p) {
  switch (p.activation) {
    case OPTCC_ACT_RELU:
      return v > 0.f ? v : 0.f;
    case OPTCC_ACT_GELU:
      return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case OPTCC_ACT_GELU_TANH: {
      float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.f + tanhf(inner));
    }
    case OPTCC_ACT_CLIP:
      return fminf(fmaxf(v, p.clip_min), p.clip_max);
    default:
      return v;
  }
}

CUTLASS_HOST_DEVICE float epilogue_value(float acc, float alpha, float bias, float residual,
                                                EpilogueParams const& p) {
  float v = acc * alpha + bias;
  if (!p.residual_after_activation) v += residual;
  v = activate(v, p);
  if (p.residual_after_activation) v += residual;
  return v * p.out_scale;
}

// The compute node of the epilogue visitor trees: inputs are the accumulator, the
// per-channel alpha and bias and the residual, already converted to fp32 fragments.
// CUTLASS reads the runtime arguments type from EpilogueFn<ElementCompute>, and calls the
// fragment specialization.
template <class Fragment>
struct EpilogueFn {
  using Arguments = EpilogueParams;
};

template <int N>
struct EpilogueFn<cutlass::Array<float, N>> {
  using Arguments = EpilogueParams;
  using Fragment = cutlass::Array<float, N>;

  CUTLASS_HOST_DEVICE Fragment operator()(Fragment const& acc, Fragment const& alpha,
                                          Fragment const& bias, Fragment const& residual,
                                          Arguments const& p) const {
    Fragment out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) {
      out[i] = epilogue_value(acc[i], alpha[i], bias[i], residual[i], p);
    }
    return out;
  }
};

inline EpilogueParams epilogue_params(optcc_sparse_gemm_args const& a) {
  EpilogueParams p;
  p.activation = a.activation;
  p.residual_after_activation = a.residual_after_activation;
  p.clip_min = a.clip_min;
  p.clip_max = a.clip_max;
  p.out_scale = a.out_scale;
  return p;
}

}  // namespace optcc
