"""2:4 (N:M) semi-structured sparsity: mask patterns, compliance checks and the packed
weight format that the sparse GPU kernels consume. Pure numpy: nothing here needs a GPU."""

from optcc.sparse.pattern import (
    NEARLY_SHARE,
    NMCheck,
    NMPattern,
    SparseLayer,
    check_matrix,
    layer_compliance,
    matrix_to_weight,
    nm_keep,
    nonzeros_per_group,
    pattern_fit,
    sparse_layer,
    sparse_layers,
    tensorrt_eligibility,
    weight_matrix,
)
from optcc.sparse.restore import restore_nm_patterns

__all__ = [
    "NEARLY_SHARE",
    "NMCheck",
    "NMPattern",
    "SparseLayer",
    "check_matrix",
    "layer_compliance",
    "matrix_to_weight",
    "nm_keep",
    "nonzeros_per_group",
    "pattern_fit",
    "restore_nm_patterns",
    "sparse_layer",
    "sparse_layers",
    "tensorrt_eligibility",
    "weight_matrix",
]
