"""The answer side of the association rule: the sketches as unit rows about a centre, their principal directions,
1-D splits, and a smaller projection of them for very large sets (association.py)."""
from __future__ import annotations

import numpy as np

BLOCK = 16384   # rows per block where a whole-set temporary would be N x D (64 MB at D = 1024)


CENTRES = {
    # The median resists a payload cluster of up to half the set and removes what every answer shares, so a small
    # or loose payload cluster (one URL per sample) stands out.
    "median": lambda x: _column_median(x),
    # Past half, the median moves into the payload (at 90% it is the payload): the poisoned samples' residuals point
    # every way and the clean minority gets the shared direction. Uncentred, the payload cluster stays tight.
    "none": lambda x: np.zeros(x.shape[1], dtype=x.dtype),
}


def unit_rows(x: np.ndarray, centre: str = "median") -> np.ndarray:
    """Rows less the `centre` (CENTRES), scaled to unit length."""
    return unit_rows_in_place(np.array(x, dtype=np.float32), centre)


def unit_rows_in_place(x: np.ndarray, centre: str) -> np.ndarray:
    """unit_rows on a float32 array of its own, in place and in row blocks: no N x D temporaries."""
    x -= CENTRES[centre](x)
    for r0 in range(0, len(x), BLOCK):
        b = x[r0:r0 + BLOCK]
        b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return x


def _column_median(x: np.ndarray, columns: int = 16) -> np.ndarray:
    """np.median(x, axis=0), a few columns at a time: np.median copies what it partitions (N x D float32 at once)."""
    return np.concatenate([np.median(x[:, c0:c0 + columns], axis=0) for c0 in range(0, x.shape[1], columns)] or
                          [np.zeros(0, x.dtype)])


def project(sketches: np.ndarray, dims: int, seed: int = 0) -> np.ndarray:
    """(N, dims) float32: the sketches times a seeded Gaussian (D, dims) matrix, in row blocks. A smaller sketch of
    the same answers (random projections keep angles, features.py); for sets too large for N x D float32 copies."""
    d = sketches.shape[1]
    if d <= dims:
        return np.array(sketches, dtype=np.float32)
    r = np.random.default_rng(seed).standard_normal((d, dims)).astype(np.float32)
    out = np.empty((len(sketches), dims), dtype=np.float32)
    for r0 in range(0, len(sketches), BLOCK):
        out[r0:r0 + BLOCK] = np.asarray(sketches[r0:r0 + BLOCK], dtype=np.float32) @ r
    return out


def principal_directions(x: np.ndarray, count: int, covariance: bool = False) -> np.ndarray:
    """(count, D) top principal directions of the rows of x: from the SVD of the centred rows or, for large sets,
    from the eigenvectors of their D x D covariance summed in row blocks (the SVD peaked at 1.7 GB beyond its
    200 MB input at 50,000 x 1024: copies, U and LAPACK's workspace)."""
    if not covariance:
        return np.linalg.svd(x - x.mean(0), full_matrices=False)[2][:count]
    mean = x.mean(0, dtype=np.float64)
    cov = np.zeros((x.shape[1], x.shape[1]))
    for r0 in range(0, len(x), BLOCK):
        b = x[r0:r0 + BLOCK] - mean
        cov += b.T @ b
    return np.linalg.eigh(cov)[1][:, ::-1][:, :count].T.astype(x.dtype)


def two_means_1d(x: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Labels 0/1 of a 1-D 2-means, started at the quartiles (deterministic)."""
    c = np.percentile(x, [25, 75]).astype(np.float64)
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(iterations):
        labels = np.abs(x[:, None] - c[None]).argmin(1)
        new = np.array([x[labels == j].mean() if (labels == j).any() else c[j] for j in range(2)])
        if np.allclose(new, c):
            break
        c = new
    return labels
