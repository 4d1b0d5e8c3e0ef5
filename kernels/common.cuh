// common.cuh: what every kernel family shares: the registry entry type, error reporting
// and the element types behind the C enums.
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"

#include "optcc_kernels.h"

namespace optcc {

// Records the message returned by optcc_last_error() (thread-local); returns `code`.
int fail(int code, std::string const& message);

inline int check_cuda(cudaError_t err, char const* what) {
  if (err == cudaSuccess) return OPTCC_OK;
  return fail(OPTCC_ERR_CUDA, std::string(what) + ": " + cudaGetErrorString(err));
}

inline int check_cutlass(cutlass::Status status, char const* what) {
  if (status == cutlass::Status::kSuccess) return OPTCC_OK;
  return fail(OPTCC_ERR_CUTLASS, std::string(what) + ": " + cutlassGetStatusString(status));
}

// The identity of a call: every field of the arguments (padding excluded) and the device.
inline std::string call_key(optcc_sparse_gemm_args const& a, int device) {
  std::string key;
  auto add = [&key](auto const& field) {
    key.append(reinterpret_cast<char const*>(&field), sizeof(field));
  };
  add(device);
  add(a.m), add(a.n), add(a.k), add(a.ab_dtype), add(a.d_dtype), add(a.arch), add(a.config);
  add(a.a_values), add(a.a_meta), add(a.b), add(a.d), add(a.alpha), add(a.alpha_scalar);
  add(a.bias), add(a.residual), add(a.activation), add(a.residual_after_activation);
  add(a.clip_min), add(a.clip_max), add(a.out_scale), add(a.workspace), add(a.workspace_bytes);
  return key;
}

// Launches a CUTLASS GEMM (2.x or 3.x device adapter) on `stream`. Initialized operators
// (their kernel parameters, TMA descriptors included) are kept per call identity, so a
// repeated call with the same operands (a model's layer, run after run: torch's caching
// allocator hands out the same buffers) only launches. A new call is checked (`check`),
// built (`make_arguments`), and its workspace need, every status and the launch verified.
template <class Gemm, class Check, class MakeArguments>
int launch(optcc_sparse_gemm_args const& a, cudaStream_t stream, char const* family,
           Check&& check, MakeArguments&& make_arguments) {
  static std::mutex lock;
  static std::unordered_map<std::string, std::shared_ptr<Gemm>> initialized;
  int device = 0;
  int rc = check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  if (rc != OPTCC_OK) return rc;
  std::string key = call_key(a, device);
  std::shared_ptr<Gemm> gemm;
  {
    std::lock_guard<std::mutex> guard(lock);
    auto found = initialized.find(key);
    if (found != initialized.end()) gemm = found->second;
  }
  std::string name(family);
  if (!gemm) {
    rc = check();
    if (rc != OPTCC_OK) return rc;
    auto args = make_arguments();
    size_t needed = Gemm::get_workspace_size(args);
    if (needed > a.workspace_bytes)
      return fail(OPTCC_ERR_WORKSPACE,
                  name + " needs " + std::to_string(needed) + " bytes of workspace");
    gemm = std::make_shared<Gemm>();
    rc = check_cutlass(gemm->initialize(args, a.workspace, stream), (name + " initialize").c_str());
    if (rc != OPTCC_OK) return rc;
    std::lock_guard<std::mutex> guard(lock);
    if (initialized.size() >= 1024) initialized.clear();  // bounded: models have few layers
    initialized.emplace(key, gemm);
  }
  rc = check_cutlass(gemm->run(stream), (name + " run").c_str());
  if (rc != OPTCC_OK) return rc;
  return check_cuda(cudaGetLastError(), (name + " launch").c_str());
}

// One compiled kernel: a family (arch), its element types and tile configuration.
struct KernelEntry {
  int arch;
  int ab_dtype;
  int d_dtype;
  char const* name;
  int (*check)(optcc_sparse_gemm_args const&);
  int (*workspace)(optcc_sparse_gemm_args const&, size_t*);
  int (*run)(optcc_sparse_gemm_args const&, cudaStream_t);
};

template <int Code>
struct ElementOf;
template <>
struct ElementOf<OPTCC_F16> {
  using type = cutlass::half_t;
};
template <>
struct ElementOf<OPTCC_BF16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct ElementOf<OPTCC_S8> {
  using type = int8_t;
};

// Shape rules shared by all families (the library's checks and optcc's planner agree on
// them: M a multiple of 32, K of 64 for 16-bit and 128 for 8-bit inputs).
inline int check_common(optcc_sparse_gemm_args const& a) {
  if (a.m <= 0 || a.n <= 0 || a.k <= 0)
    return fail(OPTCC_ERR_INVALID, "m, n and k must be positive");
  int k_multiple = a.ab_dtype == OPTCC_S8 ? 128 : 64;
  if (a.m % 32 != 0) return fail(OPTCC_ERR_INVALID, "m (output channels) must be a multiple of 32");
  if (a.k % k_multiple != 0)
    return fail(OPTCC_ERR_INVALID, "k must be a multiple of " + std::to_string(k_multiple));
  if (!a.a_values || !a.a_meta || !a.b || !a.d)
    return fail(OPTCC_ERR_INVALID, "a_values, a_meta, b and d must be device pointers");
  if (a.workspace_bytes > 0 && !a.workspace)
    return fail(OPTCC_ERR_INVALID, "workspace_bytes > 0 but workspace is NULL");
  return OPTCC_OK;
}

}  // namespace optcc
