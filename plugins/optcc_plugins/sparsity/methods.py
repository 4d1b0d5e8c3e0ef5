"""How the N:M mask is chosen, on one layer's weight matrix ``W`` (rows × K, the groups are
``m`` consecutive columns; see ``optcc.sparse.weight_matrix``).

Notation: ``X`` is the layer's input unfolded to the GEMM operand (one row per output
position and sample, one column per weight column), so the layer computes ``Y = X Wᵀ``;
``H = Σ Xᵀ X`` (K × K) is accumulated over the calibration batches.

- **magnitude**: keep the ``n`` weights of largest ``|W_ij|`` in every group.
- **Wanda** (Sun et al., 2023): score ``S_ij = |W_ij| · ‖X_j‖₂`` with ``‖X_j‖₂² = H_jj``,
  keep the ``n`` best per group; weights are not updated. A weight on an input that is
  large on the data counts for more than its magnitude says.
- **SparseGPT** (Frantar & Alistarh, 2023): minimise the layer's output error
  ``‖X Wᵀ − X Ŵᵀ‖²`` row by row, column by column, with the Optimal Brain Surgeon update.
  With ``H⁻¹ = Uᵀ U`` (U upper triangular, from the Cholesky factor of the damped inverse
  Hessian ``(H + λ I)⁻¹``, ``λ = dampening · mean(diag H)``), the columns are processed left
  to right. At the first column of every group the mask of that group is chosen per row
  by the OBS saliency ``w_ij² / U_jj²`` (the error that removing ``w_ij`` costs once the
  remaining weights compensate). Then for column ``j``: ``q_j`` is ``w_j`` with the pruned
  entries set to zero, the error ``e = (w_j − q_j) / U_jj`` is spread over the columns not
  yet processed, ``W[:, j:] −= e ⊗ U[j, j:]``: the least-squares optimal correction of the
  other weights for the removed ones. Columns are handled in blocks (lazy batch updates):
  within a block the update is immediate, the rest of the matrix receives the block's
  accumulated errors in one product. Inputs that are always zero (``H_jj = 0``) get a
  unit diagonal and zero weight.

``output_error(W, Ŵ, H) = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` with ``ΔW = W − Ŵ`` is the relative
squared error of the layer's output on the calibration data, computed from ``H`` alone: the
number every data-aware method reports per layer.
"""

from __future__ import annotations

import numpy as np

from optcc import NMPattern, nm_keep


def magnitude_keep(matrix: np.ndarray, pattern: NMPattern) -> np.ndarray:
    """Keep the ``n`` largest ``|w|`` of every group."""
    return nm_keep(np.abs(matrix), pattern)


def wanda_keep(matrix: np.ndarray, hessian: np.ndarray, pattern: NMPattern) -> np.ndarray:
    """Keep the ``n`` largest ``|w_ij| · ‖X_j‖`` of every group."""
    norms = np.sqrt(np.maximum(np.diag(hessian), 0.0))
    return nm_keep(np.abs(matrix) * norms[None, :], pattern)


def sparsegpt(
    matrix: np.ndarray, hessian: np.ndarray, pattern: NMPattern, *,
    dampening: float = 0.01, block_size: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """Prune ``matrix`` to ``pattern`` with SparseGPT's OBS update (see the module docstring).

    Returns ``(updated weights, keep mask)``; the pruned entries of the weights are exact
    zeros. ``block_size`` is rounded down to a multiple of ``m``.
    """
    m = pattern.m
    w = np.array(matrix, dtype=np.float64)
    rows, k = w.shape
    if k % m:
        raise ValueError(f"K={k} is not a multiple of {m}")
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += dampening * float(np.mean(np.diag(h)))
    u = _upper_inverse_cholesky(h)
    block = max(m, block_size - block_size % m)
    pruned = np.zeros((rows, k), dtype=bool)
    for start in range(0, k, block):
        stop = min(start + block, k)
        w1 = w[:, start:stop].copy()
        u1 = u[start:stop, start:stop]
        d = np.diag(u1)
        errors = np.zeros_like(w1)
        for i in range(stop - start):
            if i % m == 0:
                saliency = w1[:, i:i + m] ** 2 / d[i:i + m] ** 2
                order = np.argsort(saliency, axis=1, kind="stable")[:, : m - pattern.n]
                np.put_along_axis(pruned[:, start + i:start + i + m], order, True, axis=1)
            column = w1[:, i]
            kept = np.where(pruned[:, start + i], 0.0, column)
            err = (column - kept) / d[i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            w1[:, i] = kept
            errors[:, i] = err
        w[:, start:stop] = w1
        if stop < k:
            w[:, stop:] -= errors @ u[start:stop, stop:]
    w[pruned] = 0.0
    return w, ~pruned


def _upper_inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """U with ``H⁻¹ = Uᵀ U``; the diagonal is raised further if H is numerically singular."""
    k = len(h)
    scale = float(np.mean(np.diag(h))) or 1.0
    for attempt in range(8):
        extra = 0.0 if attempt == 0 else scale * 1e-4 * 10 ** (attempt - 1)
        try:
            lower_inv = np.linalg.inv(np.linalg.cholesky(h + extra * np.eye(k)))
            return np.linalg.cholesky(lower_inv.T @ lower_inv).T
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("the layer's input Hessian is not positive definite")


def output_error(before: np.ndarray, after: np.ndarray, hessian: np.ndarray) -> float:
    """Relative squared output error of the layer on the calibration data (see above)."""
    w = np.asarray(before, dtype=np.float64)
    delta = w - np.asarray(after, dtype=np.float64)
    reference = float(np.sum((w @ hessian) * w))
    if reference <= 0:
        return 0.0
    return float(np.sum((delta @ hessian) * delta)) / reference
