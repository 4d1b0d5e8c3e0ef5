// api.cu: the C interface of liboptcc_kernels.so (see optcc_kernels.h).
//
// Kernels register themselves in tables compiled from the instance files that build.py
// generates (one per family and element types); this file dispatches a call to the
// entry the caller names (or the family's first), reports errors as messages, and answers
// host-side questions about the metadata layouts from CUTLASS's own layout code, so that
// they can be checked on machines without a GPU.
#include <cuda_runtime.h>

#include <cstdio>
#include <mutex>
#include <string>
#include <vector>

#include "cutlass/util/host_reorder.h"
#include "cutlass/version.h"
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"

#include "common.cuh"
#include "sm80_sparse_gemm.cuh"
#include "sm90_sparse_gemm.cuh"

#ifndef OPTCC_BUILD_TARGETS
#define OPTCC_BUILD_TARGETS ""
#endif

namespace optcc {

// Defined in the generated registry.cu: every compiled kernel.
std::vector<KernelEntry> const& registry();

namespace {
thread_local std::string g_last_error;
}  // namespace

int fail(int code, std::string const& message) {
  g_last_error = message;
  return code;
}

namespace sm90 {

cutlass::KernelHardwareInfo hardware_info() {
  static std::mutex lock;
  static std::vector<int> counts;
  cutlass::KernelHardwareInfo hw;
  if (cudaGetDevice(&hw.device_id) != cudaSuccess) return hw;
  std::lock_guard<std::mutex> guard(lock);
  if (hw.device_id >= static_cast<int>(counts.size())) counts.resize(hw.device_id + 1, 0);
  if (counts[hw.device_id] == 0) {
    cudaDeviceGetAttribute(&counts[hw.device_id], cudaDevAttrMultiProcessorCount, hw.device_id);
  }
  hw.sm_count = counts[hw.device_id];
  return hw;
}

// The layouts every compiled Hopper kernel of an element type shares: all configurations
// use a K tile of at least 128, so CUTLASS derives the same metadata layout for each
// (instances static_assert this).
template <class ElementAB>
using ReferenceGemm =
    SparseGemm<ElementAB, ElementAB, Shape<_128, _128, _128>, Shape<_1, _1, _1>,
               cutlass::gemm::KernelTmaWarpSpecializedCooperative,
               cutlass::epilogue::TmaWarpSpecializedCooperative>;

template <class ElementAB>
struct Layouts {
  using Config = typename ReferenceGemm<ElementAB>::SparseConfig;
  static constexpr int kBitsPerLogicalE =
      cutlass::sizeof_bits<typename Config::ElementEMmaRaw>::value /
      int(typename Config::ElementEMmaSparsity{});

  static int64_t meta_bytes(int m, int k) {
    auto layout = Config::fill_layoutE(make_shape(m, 1, k, 1));
    return int64_t(cute::cosize(layout)) * kBitsPerLogicalE / 8;
  }

  static void nibble_offsets(int m, int k, int64_t* out) {
    auto layout = Config::fill_layoutE(make_shape(m, 1, k, 1));
    int groups = k / 4;
    for (int row = 0; row < m; ++row)
      for (int g = 0; g < groups; ++g)
        out[int64_t(row) * groups + g] = int64_t(layout(row, 4 * g, 0)) * kBitsPerLogicalE / 4;
  }
};

template <class ElementAB>
int compress(int m, int k, void const* dense, void* values, void* meta, cudaStream_t stream) {
  using Config = typename Layouts<ElementAB>::Config;
  using ProblemShape = Shape<int, int, int, int>;
  using Kernel = cutlass::transform::kernel::StructuredSparseCompressor<
      ProblemShape, ElementAB, cutlass::layout::RowMajor, Config, cutlass::arch::Sm90>;
  using Compressor = cutlass::transform::device::TransformUniversalAdapter<Kernel>;
  ProblemShape shape = make_shape(m, 1, k, 1);
  auto stride = cutlass::make_cute_packed_stride(cutlass::gemm::TagToStrideA_t<cutlass::layout::RowMajor>{},
                                                 make_shape(m, k, 1));
  cutlass::KernelHardwareInfo hw = hardware_info();
  typename Compressor::Arguments args{shape, {dense, stride, values, meta}, {hw}};
  Compressor op;
  if (Compressor::get_workspace_size(args) != 0)
    return fail(OPTCC_ERR_WORKSPACE, "the sm90 compressor unexpectedly needs workspace");
  int rc = check_cutlass(op.can_implement(args), "sm90 compressor can_implement");
  if (rc != OPTCC_OK) return rc;
  rc = check_cutlass(op.initialize(args, nullptr, stream), "sm90 compressor initialize");
  if (rc != OPTCC_OK) return rc;
  rc = check_cutlass(op.run(stream), "sm90 compressor run");
  if (rc != OPTCC_OK) return rc;
  return check_cuda(cudaGetLastError(), "sm90 compressor launch");
}

}  // namespace sm90

namespace sm80 {

// Any compiled tile shape gives the same metadata layout; the K extent must fit the type.
template <class ElementAB>
using ReferenceGemm = std::conditional_t<
    std::is_same_v<ElementAB, int8_t>,
    SparseGemm<ElementAB, ElementAB, cutlass::gemm::GemmShape<128, 128, 128>,
               cutlass::gemm::GemmShape<64, 64, 128>, 3>,
    SparseGemm<ElementAB, ElementAB, cutlass::gemm::GemmShape<128, 128, 64>,
               cutlass::gemm::GemmShape<64, 64, 64>, 3>>;

template <class ElementAB>
struct Layouts {
  using Gemm = ReferenceGemm<ElementAB>;
  using ElementE = typename Gemm::ElementE;
  using LayoutE = typename Gemm::LayoutE;
  static constexpr int kCodesPerWord = cutlass::sizeof_bits<ElementE>::value / 4;

  static int64_t meta_bytes(int m, int k) {
    return int64_t(m) * (k / 4 / kCodesPerWord) * int64_t(sizeof(ElementE));
  }

  // Runs CUTLASS's host reorder_meta on word ids (16 bits at a time, so any size fits the
  // word type) and inverts it: the position of each plain word in the reordered buffer.
  static void nibble_offsets(int m, int k, int64_t* out) {
    int cols = k / 4 / kCodesPerWord;
    size_t words = size_t(m) * cols;
    std::vector<int64_t> position(words, 0);
    int passes = (cutlass::sizeof_bits<int64_t>::value + 15) / 16;
    for (int pass = 0; pass < passes; ++pass) {
      std::vector<ElementE> src(words), dst(words);
      for (size_t i = 0; i < words; ++i) src[i] = ElementE((i >> (16 * pass)) & 0xFFFF);
      cutlass::TensorRef<ElementE, cutlass::layout::RowMajor> src_ref(src.data(),
                                                                       cutlass::layout::RowMajor(cols));
      cutlass::TensorRef<ElementE, LayoutE> dst_ref(dst.data(), LayoutE::packed({m, cols}));
      cutlass::reorder_meta(dst_ref, src_ref, {m, 0, cols});
      for (size_t p = 0; p < words; ++p) position[p] |= int64_t(dst[p] & 0xFFFF) << (16 * pass);
    }
    for (size_t p = 0; p < words; ++p) {
      int64_t word = position[p];  // the plain word stored at physical position p
      int64_t row = word / cols, col = word % cols;
      for (int j = 0; j < kCodesPerWord; ++j)
        out[row * (k / 4) + col * kCodesPerWord + j] = int64_t(p) * kCodesPerWord + j;
    }
  }
};

}  // namespace sm80

namespace {

KernelEntry const* find_entry(optcc_sparse_gemm_args const& a) {
  int index = 0;
  for (auto const& e : registry()) {
    if (e.arch != a.arch || e.ab_dtype != a.ab_dtype || e.d_dtype != a.d_dtype) continue;
    if (a.config < 0 || index == a.config) return &e;
    ++index;
  }
  return nullptr;
}

int missing_entry(optcc_sparse_gemm_args const& a) {
  return fail(OPTCC_ERR_UNSUPPORTED,
              "no kernel in this build for arch " + std::to_string(a.arch) + ", input type " +
                  std::to_string(a.ab_dtype) + ", output type " + std::to_string(a.d_dtype) +
                  ", config " + std::to_string(a.config));
}

template <class Fn>
auto for_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case OPTCC_F16: return fn(cutlass::half_t{});
    case OPTCC_BF16: return fn(cutlass::bfloat16_t{});
    default: return fn(int8_t{});
  }
}

bool valid_layout_request(int arch, int dtype, int m, int k) {
  if (arch != OPTCC_ARCH_SM80 && arch != OPTCC_ARCH_SM90) {
    fail(OPTCC_ERR_INVALID, "arch must be 80 or 90");
    return false;
  }
  if (dtype != OPTCC_F16 && dtype != OPTCC_BF16 && dtype != OPTCC_S8) {
    fail(OPTCC_ERR_INVALID, "unknown element type");
    return false;
  }
  int k_multiple = arch == OPTCC_ARCH_SM80 ? (dtype == OPTCC_S8 ? 64 : 32) : 8;
  int m_multiple = arch == OPTCC_ARCH_SM80 ? (dtype == OPTCC_S8 ? 16 : 32) : 1;
  if (m <= 0 || k <= 0 || m % m_multiple || k % k_multiple) {
    fail(OPTCC_ERR_INVALID, "shape " + std::to_string(m) + "x" + std::to_string(k) +
                                " does not fit the metadata layout");
    return false;
  }
  return true;
}

std::string json_escape(char const* s) {
  std::string out;
  for (; *s; ++s) {
    if (*s == '"' || *s == '\\') out += '\\';
    out += *s;
  }
  return out;
}

}  // namespace
}  // namespace optcc

extern "C" {

void optcc_sparse_gemm_args_init(optcc_sparse_gemm_args* args) {
  *args = optcc_sparse_gemm_args{};
  args->arch = OPTCC_ARCH_SM90;
  args->config = -1;
  args->alpha_scalar = 1.f;
  args->out_scale = 1.f;
  args->d_dtype = OPTCC_F16;
}

int optcc_sparse_gemm_check(optcc_sparse_gemm_args const* args) {
  if (!args) return optcc::fail(OPTCC_ERR_INVALID, "args is NULL");
  auto entry = optcc::find_entry(*args);
  if (!entry) return optcc::missing_entry(*args);
  return entry->check(*args);
}

int optcc_sparse_gemm_workspace_size(optcc_sparse_gemm_args const* args, size_t* bytes) {
  if (!args || !bytes) return optcc::fail(OPTCC_ERR_INVALID, "args or bytes is NULL");
  auto entry = optcc::find_entry(*args);
  if (!entry) return optcc::missing_entry(*args);
  return entry->workspace(*args, bytes);
}

int optcc_sparse_gemm(optcc_sparse_gemm_args const* args, void* stream) {
  if (!args) return optcc::fail(OPTCC_ERR_INVALID, "args is NULL");
  auto entry = optcc::find_entry(*args);
  if (!entry) return optcc::missing_entry(*args);
  return entry->run(*args, static_cast<cudaStream_t>(stream));
}

char const* optcc_last_error(void) { return optcc::g_last_error.c_str(); }

int optcc_abi_version(void) { return OPTCC_KERNELS_ABI_VERSION; }

int optcc_num_configs(int arch, int ab_dtype, int d_dtype) {
  int count = 0;
  for (auto const& e : optcc::registry())
    count += e.arch == arch && e.ab_dtype == ab_dtype && e.d_dtype == d_dtype;
  return count;
}

char const* optcc_config_name(int arch, int ab_dtype, int d_dtype, int index) {
  int seen = 0;
  for (auto const& e : optcc::registry()) {
    if (e.arch != arch || e.ab_dtype != ab_dtype || e.d_dtype != d_dtype) continue;
    if (seen++ == index) return e.name;
  }
  return nullptr;
}

char const* optcc_build_info(void) {
  static std::string info = [] {
    std::string s = "{\"abi\": " + std::to_string(OPTCC_KERNELS_ABI_VERSION);
    s += ", \"cutlass\": \"" + std::to_string(CUTLASS_MAJOR) + "." +
         std::to_string(CUTLASS_MINOR) + "." + std::to_string(CUTLASS_PATCH) + "\"";
    s += ", \"nvcc\": \"" + std::to_string(__CUDACC_VER_MAJOR__) + "." +
         std::to_string(__CUDACC_VER_MINOR__) + "\"";
    s += ", \"targets\": \"" + optcc::json_escape(OPTCC_BUILD_TARGETS) + "\"";
    s += ", \"kernels\": [";
    bool first = true;
    for (auto const& e : optcc::registry()) {
      s += first ? "" : ", ";
      first = false;
      s += "{\"arch\": " + std::to_string(e.arch) + ", \"ab\": " + std::to_string(e.ab_dtype) +
           ", \"d\": " + std::to_string(e.d_dtype) + ", \"name\": \"" +
           optcc::json_escape(e.name) + "\"}";
    }
    s += "]}";
    return s;
  }();
  return info.c_str();
}

int64_t optcc_meta_bytes(int arch, int ab_dtype, int m, int k) {
  if (!optcc::valid_layout_request(arch, ab_dtype, m, k)) return -1;
  return optcc::for_dtype(ab_dtype, [&](auto element) -> int64_t {
    using E = decltype(element);
    return arch == OPTCC_ARCH_SM90 ? optcc::sm90::Layouts<E>::meta_bytes(m, k)
                                   : optcc::sm80::Layouts<E>::meta_bytes(m, k);
  });
}

int optcc_meta_nibble_offsets(int arch, int ab_dtype, int m, int k, int64_t* out) {
  if (!out) return optcc::fail(OPTCC_ERR_INVALID, "out is NULL");
  if (!optcc::valid_layout_request(arch, ab_dtype, m, k)) return OPTCC_ERR_INVALID;
  optcc::for_dtype(ab_dtype, [&](auto element) {
    using E = decltype(element);
    if (arch == OPTCC_ARCH_SM90)
      optcc::sm90::Layouts<E>::nibble_offsets(m, k, out);
    else
      optcc::sm80::Layouts<E>::nibble_offsets(m, k, out);
    return 0;
  });
  return OPTCC_OK;
}

int optcc_compress_sm90(int ab_dtype, int m, int k, void const* dense, void* values, void* meta,
                        void* stream) {
  if (!optcc::valid_layout_request(OPTCC_ARCH_SM90, ab_dtype, m, k)) return OPTCC_ERR_INVALID;
  if (!dense || !values || !meta)
    return optcc::fail(OPTCC_ERR_INVALID, "dense, values and meta must be device pointers");
  return optcc::for_dtype(ab_dtype, [&](auto element) {
    return optcc::sm90::compress<decltype(element)>(m, k, dense, values, meta,
                                                    static_cast<cudaStream_t>(stream));
  });
}

}  // extern "C"
