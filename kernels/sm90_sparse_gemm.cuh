// sm90_sparse_gemm.cuh: 2:4 sparse GEMM for Hopper (sm_90a) on CUTLASS 3.x.
//
// The mainloop is CUTLASS's warp-specialized sparse collective (TMA loads, wgmma.sp),
// chosen by its CollectiveBuilder. The epilogue is a visitor tree (EVT) of CUTLASS nodes:
//
//   D = EpilogueFn(acc, alpha[m], bias[m], residual[n, m])   (see epilogue.cuh)
//
// alpha and bias are per-output-channel column broadcasts (a null pointer falls back to a
// scalar), the residual is a TMA-loaded auxiliary tensor (null: skipped, no load), and D is
// stored column-major (M contiguous), which is the row-major [tokens][channels] output of a
// Linear layer. A is the compressed weight in CUTLASS's Hopper metadata layout
// (SparseConfig::fill_layoutE), which optcc.sparse.packing reproduces on the host.
#pragma once

#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/util/packed_stride.hpp"

#include "common.cuh"
#include "epilogue.cuh"

namespace optcc::sm90 {

using namespace cute;

// The current device and its multiprocessor count (queried once per device).
cutlass::KernelHardwareInfo hardware_info();

template <class ElementAB_, class ElementD_, class TileShape_, class ClusterShape_,
          class KernelSchedule_, class EpilogueSchedule_>
struct SparseGemm {
  using ElementAB = ElementAB_;
  using ElementD = ElementD_;
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;
  using ElementAcc = std::conditional_t<std::is_same_v<ElementAB, int8_t>, int32_t, float>;
  using ElementResidual = std::conditional_t<std::is_same_v<ElementAB, cutlass::bfloat16_t>,
                                             cutlass::bfloat16_t, cutlass::half_t>;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::ColumnMajor;
  static constexpr int kAlignAB = 128 / cutlass::sizeof_bits<ElementAB>::value;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;

  using EpilogueDesc = cutlass::epilogue::collective::detail::EpilogueDescriptor<
      TileShape, cutlass::epilogue::collective::EpilogueTileAuto, void, ElementD,
      EpilogueSchedule_>;
  using ResidualDesc = cutlass::epilogue::collective::detail::AuxLoadDescriptor<
      EpilogueDesc, LayoutD, ElementResidual>;
  using Residual = cutlass::epilogue::fusion::Sm90AuxLoad<
      ResidualDesc::Stages, typename EpilogueDesc::EpilogueTile, ElementResidual,
      typename ResidualDesc::Stride, typename ResidualDesc::SmemLayoutAtom,
      typename ResidualDesc::CopyOpS2R>;
  using ChannelVector = cutlass::epilogue::fusion::Sm90ColBroadcast<
      0, TileShape, float, float, Stride<_1, _0, int64_t>>;
  using Compute = cutlass::epilogue::fusion::Sm90Compute<
      EpilogueFn, ElementD, float, cutlass::FloatRoundStyle::round_to_nearest>;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<
      Compute, cutlass::epilogue::fusion::Sm90AccFetch, ChannelVector, ChannelVector, Residual>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float,
      void, LayoutD, kAlignD, ElementD, LayoutD, kAlignD, EpilogueSchedule_,
      Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, ElementAB, LayoutA, kAlignAB,
      ElementAB, LayoutB, kAlignAB, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule_>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>,
                                                      CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using SparseConfig = typename CollectiveMainloop::SparseConfig;
  using ElementE = typename CollectiveMainloop::ElementE;

  static typename Gemm::Arguments arguments(optcc_sparse_gemm_args const& a,
                                            cutlass::KernelHardwareInfo hw) {
    auto shape = make_shape(a.m, a.n, a.k, 1);
    auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{},
                                                     make_shape(a.n, a.k, 1));
    auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{},
                                                     make_shape(a.m, a.n, 1));
    auto stride_r = cutlass::make_cute_packed_stride(typename ResidualDesc::Stride{},
                                                     make_shape(a.m, a.n, 1));
    typename Gemm::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = shape;
    args.mainloop.ptr_A = static_cast<ElementAB const*>(a.a_values);
    args.mainloop.layout_a = SparseConfig::fill_layoutA(shape);
    args.mainloop.ptr_B = static_cast<ElementAB const*>(a.b);
    args.mainloop.dB = stride_b;
    args.mainloop.ptr_E = static_cast<ElementE const*>(a.a_meta);
    args.mainloop.layout_e = SparseConfig::fill_layoutE(shape);
    args.epilogue.thread = {
        {},                                                            // accumulator
        {a.alpha, a.alpha_scalar, {}},                                 // alpha[m]
        {a.bias, 0.f, {}},                                             // bias[m]
        {static_cast<ElementResidual const*>(a.residual), ElementResidual(0), stride_r},
        epilogue_params(a)};
    args.epilogue.ptr_C = nullptr;
    args.epilogue.ptr_D = static_cast<ElementD*>(a.d);
    args.epilogue.dD = stride_d;
    args.hw_info = hw;
    return args;
  }

  static int check(optcc_sparse_gemm_args const& a) {
    int rc = check_common(a);
    if (rc != OPTCC_OK) return rc;
    if (a.m % kAlignD != 0)
      return fail(OPTCC_ERR_INVALID,
                  "m must be a multiple of " + std::to_string(kAlignD) + " for this output type");
    if (Gemm::can_implement(arguments(a, cutlass::KernelHardwareInfo{0, 1})) != cutlass::Status::kSuccess)
      return fail(OPTCC_ERR_CUTLASS, "CUTLASS cannot implement this sm_90 problem "
                                     "(alignment or metadata layout)");
    return OPTCC_OK;
  }

  static int workspace(optcc_sparse_gemm_args const& a, size_t* bytes) {
    *bytes = Gemm::get_workspace_size(arguments(a, hardware_info()));
    return OPTCC_OK;
  }

  static int run(optcc_sparse_gemm_args const& a, cudaStream_t stream) {
    return launch<Gemm>(a, stream, "sm90", [&] { return check(a); },
                        [&] { return arguments(a, hardware_info()); });
  }
};

}  // namespace optcc::sm90
