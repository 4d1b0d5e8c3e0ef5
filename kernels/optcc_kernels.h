/*
 * optcc_kernels.h: the plain C interface of liboptcc_kernels.so.
 *
 * The library holds 2:4 semi-structured sparse GEMMs with fused epilogues, built on
 * CUTLASS, for NVIDIA Ampere (sm_80 family: mma.sp) and Hopper (sm_90a: wgmma.sp).
 * It links no framework: callers pass raw device pointers and a CUDA stream, so the
 * same binary serves optcc's torch-based "cuda" backend, a TensorRT plugin and tests
 * (ctypes, cupy, anything that can call C).
 *
 * The operation, for a sparse weight A (M x K, 2:4 along K), a dense input B and an
 * output D, all indices 0-based:
 *
 *     acc[m, n]  = sum_k A[m, k] * B[n, k]              (fp32, or int32 for int8 inputs)
 *     v          = acc[m, n] * alpha[m] + bias[m]
 *     v          = v + residual[n, m]                   (when residual_after_activation == 0)
 *     v          = act(v)
 *     v          = v + residual[n, m]                   (when residual_after_activation == 1)
 *     D[n, m]    = convert(v * out_scale)               (int8 output: round half to even, saturate)
 *
 * Memory layouts (row-major, element strides in brackets):
 *   B         [N][K]  (a layer's input, tokens x features; ld = K)
 *   D         [N][M]  (the layer's output; ld = M)
 *   residual  [N][M]  (same layout as D; fp16 for fp16/int8 inputs, bf16 for bf16 inputs)
 *   A values  [M][K/2] (the kept values of each group of 4, in order)
 *   A meta    2-bit indices of the kept values, in the architecture's own layout
 *             (optcc.sparse.packing writes both layouts; see optcc_meta_bytes).
 * So for a Linear layer y = x W^T + b, B is x, A is W and D is y, with no transposes.
 *
 * Every function returns OPTCC_OK (0) or an error code; optcc_last_error() then holds a
 * message (per thread). Nothing here aborts the process.
 */
#ifndef OPTCC_KERNELS_H
#define OPTCC_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define OPTCC_KERNELS_ABI_VERSION 1

/* Status codes. */
enum {
  OPTCC_OK = 0,
  OPTCC_ERR_INVALID = 1,       /* bad arguments (shape, alignment, null pointer, dtype) */
  OPTCC_ERR_UNSUPPORTED = 2,   /* no kernel in this build for the request */
  OPTCC_ERR_CUDA = 3,          /* a CUDA runtime call or kernel launch failed */
  OPTCC_ERR_CUTLASS = 4,       /* CUTLASS rejected the problem (can_implement/initialize) */
  OPTCC_ERR_WORKSPACE = 5      /* the kernel needs more workspace than was given */
};

/* Element types. */
enum { OPTCC_F16 = 0, OPTCC_BF16 = 1, OPTCC_S8 = 2 };

/* Epilogue activations. */
enum {
  OPTCC_ACT_NONE = 0,
  OPTCC_ACT_RELU = 1,
  OPTCC_ACT_GELU = 2,          /* exact: 0.5 x (1 + erf(x / sqrt 2)) */
  OPTCC_ACT_GELU_TANH = 3,     /* tanh approximation */
  OPTCC_ACT_CLIP = 4           /* min(max(x, clip_min), clip_max), e.g. ReLU6 */
};

/* Kernel families; each reads its own metadata layout. */
enum { OPTCC_ARCH_SM80 = 80, OPTCC_ARCH_SM90 = 90 };

typedef struct optcc_sparse_gemm_args {
  int32_t m, n, k;                 /* output channels, tokens (rows of B and D), reduction */
  int32_t ab_dtype;                /* OPTCC_F16, OPTCC_BF16 or OPTCC_S8 (A and B alike) */
  int32_t d_dtype;                 /* output: the input type, or F16 / S8 for int8 inputs */
  int32_t arch;                    /* OPTCC_ARCH_SM80 or OPTCC_ARCH_SM90 */
  int32_t config;                  /* tile configuration index, -1: the family's default */
  const void* a_values;            /* [M][K/2] */
  const void* a_meta;              /* metadata in the family's layout */
  const void* b;                   /* [N][K] */
  void* d;                         /* [N][M] */
  const float* alpha;              /* [M] per output channel, or NULL: alpha_scalar */
  float alpha_scalar;
  const float* bias;               /* [M] or NULL */
  const void* residual;            /* [N][M] or NULL */
  int32_t activation;              /* OPTCC_ACT_* */
  int32_t residual_after_activation;
  float clip_min, clip_max;        /* OPTCC_ACT_CLIP bounds */
  float out_scale;                 /* 1 for float outputs; 1/scale to requantize to int8 */
  void* workspace;                 /* device memory, or NULL when workspace_bytes is 0 */
  size_t workspace_bytes;
} optcc_sparse_gemm_args;

/* Fill args with the neutral defaults (alpha 1, no bias/residual/activation, scale 1). */
void optcc_sparse_gemm_args_init(optcc_sparse_gemm_args* args);

/* Run one sparse GEMM on `stream` (a cudaStream_t; NULL for the default stream). */
int optcc_sparse_gemm(const optcc_sparse_gemm_args* args, void* stream);

/* Device workspace the call needs, in bytes (0 for most configurations). */
int optcc_sparse_gemm_workspace_size(const optcc_sparse_gemm_args* args, size_t* bytes);

/* Whether a kernel exists and accepts the shape: OPTCC_OK, or the reason as an error. */
int optcc_sparse_gemm_check(const optcc_sparse_gemm_args* args);

/* The message of the last error on this thread ("" if none). */
const char* optcc_last_error(void);

/* OPTCC_KERNELS_ABI_VERSION of the build. */
int optcc_abi_version(void);

/* JSON: CUTLASS version, nvcc version, compiled targets, kernel families and configs. */
const char* optcc_build_info(void);

/* Tile configurations compiled for (arch, ab_dtype, d_dtype); names for reports. */
int optcc_num_configs(int arch, int ab_dtype, int d_dtype);
const char* optcc_config_name(int arch, int ab_dtype, int d_dtype, int index);

/* ---- Host-side layout facts (no GPU needed) ------------------------------------- */

/* Bytes of metadata for an M x K weight in the family's layout (with its padding). */
int64_t optcc_meta_bytes(int arch, int ab_dtype, int m, int k);

/* For each row m and each group of 4 along K (chunk c), the position of that group's
 * 4-bit code in the metadata buffer, as a nibble index (byte = idx / 2, high nibble when
 * idx is odd). out has m * (k / 4) entries, row-major. Derived from CUTLASS's own
 * layouts, so tests can check the numpy packer against the kernels without a GPU. */
int optcc_meta_nibble_offsets(int arch, int ab_dtype, int m, int k, int64_t* out);

/* ---- Device-side compressor (Hopper layout, CUTLASS's own kernel) ----------------- */

/* Compress a dense row-major [M][K] 2:4 weight on the device into values and sm_90
 * metadata (buffers sized by optcc_meta_bytes and M * K / 2 elements). */
int optcc_compress_sm90(int ab_dtype, int m, int k, const void* dense, void* values,
                        void* meta, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* OPTCC_KERNELS_H */
