"""Unmixed region pooling: region embeddings solved from the feature cells they share with their neighbours.

The encoder sees a squashed copy of the image on a coarse g×g grid, so a small region covers a few cells and most
of them are partly another region's. Plain mask pooling (`bank_builder.embed.pool_segments`) averages whole cells,
neighbours included. Here a cell's feature is modelled as the coverage-weighted mix of the embeddings of the
regions covering it (coverage: the exact fractions `bank_builder.prepare.prepare_image` computes, which sum to 1
per cell when the regions cover the image), and the embeddings are the regularised least-squares solution

    min_E  Σ_p ‖f_p − Σ_i a_ip e_i‖²  +  λ Σ_i w_i ‖e_i − ē_i‖²,

with ē_i the plain pooled (coverage-weighted mean) embedding and w_i = Σ_p a_ip the region's area in cells, so a
region is pulled toward its plain embedding in proportion to its size and λ is independent of the grid.
λ → ∞ gives the plain pooled embeddings; λ → 0 the unregularised unmixing (ill-posed for regions smaller than a
cell, hence the ridge).
"""

from __future__ import annotations

import numpy as np


def unmix_embeddings(coverage: np.ndarray, cells: np.ndarray, strength: float) -> np.ndarray:
    """(n, P) coverage of P = g·g feature cells by n regions + (P, C) cell features → (n, C) float32 L2-normalised
    unmixed embeddings (the ridge solution above, strength λ = `strength` > 0)."""
    if strength <= 0:
        raise ValueError(f"unmixing strength must be > 0 (the ridge keeps small regions solvable), got {strength}")
    a = np.asarray(coverage, np.float64)
    f = np.asarray(cells, np.float64)
    if a.ndim != 2 or f.ndim != 2 or a.shape[1] != f.shape[0]:
        raise ValueError(f"coverage {a.shape} must be (n, P) and cells {f.shape} (P, C)")
    area = a.sum(axis=1)
    if np.any(area <= 0):
        raise ValueError("a region covers no feature cell; drop empty regions before unmixing")
    # normal equations: (A Aᵀ + λ W) E = A F + λ W Ē, and W Ē = A F since Ē_i = (A F)_i / w_i
    gram = a @ a.T + strength * np.diag(area)
    solved = np.linalg.solve(gram, (1 + strength) * (a @ f))
    norm = np.linalg.norm(solved, axis=1, keepdims=True)
    return (solved / np.where(norm > 0, norm, 1)).astype(np.float32)
