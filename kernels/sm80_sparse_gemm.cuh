// sm80_sparse_gemm.cuh: 2:4 sparse GEMM for Ampere-class GPUs (mma.sp) on CUTLASS 2.x.
//
// The mainloop is CUTLASS's SparseGemmWithVisitor (multistage cp.async pipeline, sparse
// tensor-core MMA with metadata in ColumnMajorInterleaved<2> order, the layout that
// optcc.sparse.packing's "sm80" format writes). The epilogue is an EVT of CUTLASS 2.x
// visitor nodes around optcc's EpilogueFn (epilogue.cuh):
//
//   D[n, m] = EpilogueFn(acc[m, n], alpha[m], bias[m], residual[n, m])
//
// CUTLASS's 2.x sparse kernels need N (tokens) to be a multiple of 8 (16 for INT8):
// callers pad the rows (optcc's cuda backend does). The output is stored column-major
// (M contiguous) so that D is the row-major
// [tokens][channels] output of a Linear layer. The 2.x epilogue thread map walks N
// fastest, so D and the residual are accessed one element per thread (alignment 1);
// the mainloop, where the time goes for real layer sizes, is unaffected.
//
// Built as compute_80 PTX compiled to sm_80 and sm_90 machine code, so the same kernels
// run natively on Ampere, Ada and Hopper (the Hopper build is how they are tested on an
// H100/H200).
#pragma once

#include <type_traits>

// clang-format off: the visitor header needs the GEMM headers first
#include "cutlass/cutlass.h"
#include "cutlass/gemm/device/gemm_sparse_with_visitor.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"
// clang-format on

#include "common.cuh"
#include "epilogue.cuh"

namespace optcc::sm80 {

using namespace cute;
namespace tb = cutlass::epilogue::threadblock;

// CUTLASS 2.x compute node that applies EpilogueFn with its runtime parameters.
template <class ElementOutput>
struct EpilogueCompute {
  using Arguments = EpilogueParams;
  using Params = Arguments;
  struct SharedStorage {};

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args,
                                                  void*) {
    return args;
  }

  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }

  CUTLASS_HOST_DEVICE EpilogueCompute() {}
  CUTLASS_HOST_DEVICE EpilogueCompute(Params const& params, SharedStorage const&)
      : params_ptr(&params) {}

  Params const* params_ptr = nullptr;

  struct Callbacks : tb::EmptyCallbacks {
    Params const* params_ptr;

    template <class ElementAccumulator, class... ElementInputs, int N>
    CUTLASS_DEVICE cutlass::Array<ElementOutput, N> visit(
        int, int, int, int, cutlass::Array<ElementAccumulator, N> const&,
        cutlass::Array<ElementInputs, N> const&... inputs) {
      EpilogueFn<cutlass::Array<float, N>> fn;
      cutlass::NumericArrayConverter<ElementOutput, float, N,
                                     cutlass::FloatRoundStyle::round_to_nearest>
          to_output;
      return to_output(fn(
          cutlass::NumericArrayConverter<float, ElementInputs, N>{}(inputs)..., *params_ptr));
    }
  };

  template <class ProblemShape>
  CUTLASS_DEVICE auto get_callbacks(cutlass::gemm::GemmCoord, int, ProblemShape) {
    Callbacks callbacks;
    callbacks.params_ptr = params_ptr;
    return callbacks;
  }
};

// An auxiliary load that reads zeros when its pointer is null (no residual), without
// touching memory; CUTLASS's 2.x VisitorAuxLoad always dereferences.
template <class ThreadMap, class Element, class StrideMNL>
struct OptionalAuxLoad : tb::VisitorAuxLoad<ThreadMap, Element, StrideMNL> {
  using Base = tb::VisitorAuxLoad<ThreadMap, Element, StrideMNL>;
  using Base::Base;

  template <class BaseCallbacks>
  struct Callbacks : BaseCallbacks {
    CUTLASS_DEVICE Callbacks(BaseCallbacks&& base) : BaseCallbacks(cute::move(base)) {}

    CUTLASS_DEVICE void begin_step(int step_idx) {
      if (this->params_ptr->ptr_aux == nullptr) {
        clear(this->tC_rAux(_, _, _, step_idx % Base::Stages));
        return;
      }
      BaseCallbacks::begin_step(step_idx);
    }
  };

  template <class ProblemShape>
  CUTLASS_DEVICE auto get_callbacks(cutlass::gemm::GemmCoord tile, int thread_idx,
                                    ProblemShape problem_shape) {
    auto base = Base::get_callbacks(tile, thread_idx, problem_shape);
    return Callbacks<decltype(base)>(cute::move(base));
  }
};

template <class ElementAB_, class ElementD_, class ThreadblockShape, class WarpShape,
          int Stages>
struct SparseGemm {
  using ElementAB = ElementAB_;
  using ElementD = ElementD_;
  static constexpr bool kInt8 = std::is_same_v<ElementAB, int8_t>;
  using ElementAcc = std::conditional_t<kInt8, int32_t, float>;
  using ElementResidual = std::conditional_t<std::is_same_v<ElementAB, cutlass::bfloat16_t>,
                                             cutlass::bfloat16_t, cutlass::half_t>;
  using InstructionShape = std::conditional_t<kInt8, cutlass::gemm::GemmShape<16, 8, 64>,
                                              cutlass::gemm::GemmShape<16, 8, 32>>;
  using MathOperator = std::conditional_t<kInt8, cutlass::arch::OpMultiplyAddSaturate,
                                          cutlass::arch::OpMultiplyAdd>;
  static constexpr int kAlignAB = 128 / cutlass::sizeof_bits<ElementAB>::value;
  static constexpr int kEvtStages = 1;

  // Column-major output: one element per access (see the file comment).
  using OutputMap = tb::OutputTileThreadLayout<ThreadblockShape, WarpShape, ElementD, 1,
                                               kEvtStages>;
  using ColumnMajorMNL = Stride<int64_t, int64_t, int64_t>;
  using Accum = tb::VisitorAccFetch;
  using ChannelVector = tb::VisitorColBroadcast<OutputMap, float, Stride<_1, _0, int64_t>>;
  using Residual = OptionalAuxLoad<OutputMap, ElementResidual, ColumnMajorMNL>;
  using Compute = tb::Sm80EVT<EpilogueCompute<ElementD>, Accum, ChannelVector, ChannelVector,
                              Residual>;
  using Store = tb::VisitorAuxStore<OutputMap, ElementD, cutlass::FloatRoundStyle::round_to_nearest,
                                    ColumnMajorMNL>;
  using Output = tb::Sm80EVT<Store, Compute>;

  using Gemm = cutlass::gemm::device::SparseGemmWithVisitor<
      ElementAB, cutlass::layout::RowMajor, ElementAB, cutlass::layout::ColumnMajor, ElementD,
      cutlass::layout::RowMajor, ElementAcc, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      ThreadblockShape, WarpShape, InstructionShape, Output,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Stages, kAlignAB, kAlignAB,
      MathOperator, kEvtStages>;
  using ElementE = typename Gemm::GemmKernel::ElementE;
  using LayoutE = typename Gemm::GemmKernel::LayoutE;
  static constexpr int kSparse = Gemm::kSparse;
  static constexpr int kElementsPerElementE = Gemm::kElementsPerElementE;

  static typename Gemm::Arguments arguments(optcc_sparse_gemm_args const& a) {
    cutlass::gemm::GemmCoord problem(a.m, a.n, a.k);
    int meta_cols = a.k / kSparse / kElementsPerElementE;
    cutlass::TensorRef<ElementAB const, cutlass::layout::RowMajor> ref_a(
        static_cast<ElementAB const*>(a.a_values), cutlass::layout::RowMajor(a.k / kSparse));
    cutlass::TensorRef<ElementAB const, cutlass::layout::ColumnMajor> ref_b(
        static_cast<ElementAB const*>(a.b), cutlass::layout::ColumnMajor(a.k));
    // CUTLASS takes the metadata by non-const reference; the kernel only reads it.
    cutlass::TensorRef<ElementE, LayoutE> ref_e(
        const_cast<ElementE*>(static_cast<ElementE const*>(a.a_meta)),
        LayoutE::packed({a.m, meta_cols}));
    ColumnMajorMNL output_stride{int64_t(1), int64_t(a.m), int64_t(0)};
    typename Output::Arguments callbacks{
        {
            {},                                                  // accumulator
            {a.alpha, a.alpha_scalar, {}},                       // alpha[m]
            {a.bias, 0.f, {}},                                   // bias[m]
            {const_cast<ElementResidual*>(static_cast<ElementResidual const*>(a.residual)),
             ElementResidual(0), output_stride},                 // residual[n, m]
            epilogue_params(a)                                   // EpilogueFn
        },
        {static_cast<ElementD*>(a.d), output_stride}             // D[n, m]
    };
    return typename Gemm::Arguments{problem, ref_a, ref_b, ref_e, callbacks};
  }

  static int check(optcc_sparse_gemm_args const& a) {
    int rc = check_common(a);
    if (rc != OPTCC_OK) return rc;
    if (a.n % kAlignAB != 0)  // CUTLASS's 2.x sparse kernels align N like K
      return fail(OPTCC_ERR_INVALID, "n (tokens) must be a multiple of " +
                                         std::to_string(kAlignAB) +
                                         " for the sm80 kernels: pad the rows");
    if (Gemm::can_implement(arguments(a)) != cutlass::Status::kSuccess)
      return fail(OPTCC_ERR_CUTLASS, "CUTLASS cannot implement this sm_80 problem");
    return OPTCC_OK;
  }

  static int workspace(optcc_sparse_gemm_args const& a, size_t* bytes) {
    *bytes = Gemm::get_workspace_size(arguments(a));
    return OPTCC_OK;
  }

  static int run(optcc_sparse_gemm_args const& a, cudaStream_t stream) {
    return launch<Gemm>(a, stream, "sm80", [&] { return check(a); }, [&] { return arguments(a); });
  }
};

}  // namespace optcc::sm80
