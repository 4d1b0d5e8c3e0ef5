"""2:4 (N:M) semi-structured sparsity: mask patterns, compliance checks and the packed
weight format that the sparse GPU kernels consume. Pure numpy: nothing here needs a GPU."""
