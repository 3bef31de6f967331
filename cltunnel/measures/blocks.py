"""The block structure of Nguyen, Raghu & Kornblith (ICLR 2021), "Do Wide and Deep Networks Learn the Same
Things?", as pure tensor maths on per-minibatch Gram matrices (no models, no data).

A *block* is a long run of consecutive layers whose representations are all alike (minibatch CKA, §2; the
block structure, §3, Figures 1-2); the paper shows that it is carried by a dominant first principal component:
inside the block the first PC explains most of the variance, the layers share it, and removing it removes
most of their similarity (§4.1, Figure 3). :class:`BlockStats` measures these three things over
minibatches; :func:`find_block` and :func:`block_summary` read a block off the results.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from cltunnel.measures.similarity import CKA_MIN_ROWS, CKAMatrix

# A block: at least BLOCK_MIN_LAYERS consecutive layers whose CKA with one another is at least
# BLOCK_THRESHOLD, every pair of them. The paper reads its blocks off the heatmaps by eye (§3); these make
# "a large, contiguous set of layers with very similar representations" a rule one can test.
BLOCK_THRESHOLD = 0.9
BLOCK_MIN_LAYERS = 3


def centre_gram(g: torch.Tensor) -> torch.Tensor:
    """H G H with H = I - 11ᵀ/n: the Gram of the features with their mean row taken off (the rows' PCA
    works on centred features, §4.1)."""
    return g - g.mean(0, keepdim=True) - g.mean(1, keepdim=True) + g.mean()


def first_pc(centred_gram: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(λ1, trace, u1) of a centred Gram K = X Xᵀ (X the centred features): the variance along the first
    principal component, the total variance, and the unit eigenvector (n,) in sample space. X and K share
    their non-zero eigenvalues, so λ1 / trace is the share of variance the first PC explains (§4.1), and
    u1·sqrt(λ1) are the rows' scores on it. The sign of u1 is fixed (largest entry positive) for
    reproducibility; nothing here depends on it."""
    values, vectors = torch.linalg.eigh(centred_gram.double())
    u1 = vectors[:, -1]
    u1 = u1 * torch.sign(u1[u1.abs().argmax()])
    return float(values[-1]), float(centred_gram.double().trace()), u1


def remove_first_pc(centred_gram: torch.Tensor, u1: torch.Tensor) -> torch.Tensor:
    """(I - u1u1ᵀ) K (I - u1u1ᵀ): the Gram of the features with their first principal component projected
    out, the paper's test of whether the block's similarity lives in that component (§4.1). O(n²)."""
    k = centred_gram.double()
    w = k @ u1
    return k - torch.outer(u1, w) - torch.outer(w, u1) + (u1 @ w) * torch.outer(u1, u1)


class BlockStats:
    """Per-layer first-PC statistics and CKA with and without the first PC, streamed over minibatches like
    :class:`~cltunnel.measures.similarity.CKAMatrix`: each minibatch's Grams are folded into sums and dropped.

    The principal components are those of each minibatch (at least CKA_MIN_ROWS rows, the one minibatch rule
    of :func:`~cltunnel.measures.similarity.cka_batches`), a stated approximation of the paper's PCA over the
    full set: it keeps memory at one minibatch's Grams. Shares are ratios of sums over minibatches (Σλ1 /
    Σtrace), like the CKA's HSIC sums; the first-PC similarity is a row-weighted mean over minibatches."""

    def __init__(self) -> None:
        self._cka = CKAMatrix()
        self._cka_no_pc = CKAMatrix()
        self.lambda1: torch.Tensor | None = None  # (L,) Σ over minibatches of λ1
        self.trace: torch.Tensor | None = None  # (L,) Σ over minibatches of the total variance
        self.cos2: torch.Tensor | None = None  # (L, L) Σ over minibatches of n_b · (u_i · u_j)²
        self.rows = 0

    def add_grams(self, grams: list[torch.Tensor]) -> None:
        """One minibatch: the L layers' uncentred Grams (n x n, float64) of the same n rows."""
        n = grams[0].shape[0]
        if n < CKA_MIN_ROWS:
            raise ValueError(f"a first-PC minibatch needs at least {CKA_MIN_ROWS} rows, got {n}")
        centred = [centre_gram(g) for g in grams]
        pcs = [first_pc(k) for k in centred]
        lambda1 = torch.tensor([pc[0] for pc in pcs], dtype=torch.float64)
        trace = torch.tensor([pc[1] for pc in pcs], dtype=torch.float64)
        u = torch.stack([pc[2] for pc in pcs])
        cos2 = (n * (u @ u.T) ** 2).cpu()
        self._cka.add_grams(grams)
        self._cka_no_pc.add_grams([remove_first_pc(k, pc[2]) for k, pc in zip(centred, pcs)])
        self.lambda1 = lambda1 if self.lambda1 is None else self.lambda1 + lambda1
        self.trace = trace if self.trace is None else self.trace + trace
        self.cos2 = cos2 if self.cos2 is None else self.cos2 + cos2
        self.rows += n

    def cka(self) -> torch.Tensor:
        """(L, L) linear CKA, as :func:`~cltunnel.measures.similarity.cka_matrix` (§2)."""
        return self._cka.matrix()

    def cka_without_first_pc(self) -> torch.Tensor:
        """(L, L) linear CKA of the representations with each minibatch's first PC removed (§4.1, Figure 3)."""
        return self._cka_no_pc.matrix()

    def first_pc_share(self) -> torch.Tensor:
        """(L,) share of variance the first PC explains, Σλ1 / Σtrace (§4.1); NaN for a constant layer."""
        return self.lambda1 / self.trace

    def pc_cos2(self) -> torch.Tensor:
        """(L, L) squared cosine similarity of two layers' first-PC scores, row-weighted over minibatches:
        whether the layers share their first PC (§4.1); sign-free, as PCs have no sign. The scores are centred
        (u1 ⟂ 1), so this is their squared correlation."""
        return self.cos2 / self.rows


def find_block(cka: torch.Tensor | np.ndarray, threshold: float = BLOCK_THRESHOLD,
               min_layers: int = BLOCK_MIN_LAYERS, layers: list[int] | None = None) -> tuple[int, int] | None:
    """The block (§3): the longest run of representations i..j (0-based, inclusive) whose pairwise CKA are
    all at least ``threshold``, spanning at least ``min_layers`` layers; the earliest of equally long runs;
    None if none. ``layers`` gives the body layer of each representation (the inner granularity): there
    the span counts distinct body layers, so conv -> BatchNorm -> add inside one residual block (alike at
    initialisation already) is not a block. A run that fails stays failed when extended, so each start grows
    until its first failing layer: at most O(L³) comparisons, in numpy rows. NaN (a constant layer) never
    belongs to a block."""
    m = np.asarray(cka.detach().cpu() if isinstance(cka, torch.Tensor) else cka)
    groups = list(range(len(m))) if layers is None else list(layers)
    best: tuple[int, int] | None = None
    for i in range(len(m)):
        j = i
        while j + 1 < len(m) and _joins(m, i, j + 1, threshold):
            j += 1
        spans = len(set(groups[i:j + 1]))
        if spans >= min_layers and (best is None or j - i > best[1] - best[0]):
            best = (i, j)
    return best


def _joins(m: np.ndarray, i: int, j: int, threshold: float) -> bool:
    """Whether layer j is at least ``threshold`` alike to each of layers i..j, both ways round."""
    return bool(np.all(m[j, i:j + 1] >= threshold) and np.all(m[i:j + 1, j] >= threshold))


def block_summary(cka: torch.Tensor | np.ndarray, cka_no_pc: torch.Tensor | np.ndarray,
                  share: torch.Tensor | np.ndarray, span: tuple[int, int] | None) -> dict[str, float]:
    """The paper's reading of a block (§4.1): mean off-diagonal CKA inside it with and without the first PC
    (high, then low, where the first PC carries the block), and the mean first-PC share of variance in and
    out of it (higher inside). NaN where a mean is over nothing (no block, a one-layer block, no layer out)."""
    m, m_no_pc, s = (_array(x) for x in (cka, cka_no_pc, share))
    inside = np.zeros(len(s), dtype=bool)
    if span is not None:
        inside[span[0]:span[1] + 1] = True
    pairs = inside[:, None] & inside[None, :] & ~np.eye(len(s), dtype=bool)
    return {"cka_in_block": _mean(m[pairs]), "cka_in_block_without_first_pc": _mean(m_no_pc[pairs]),
            "first_pc_share_in_block": _mean(s[inside]), "first_pc_share_out_of_block": _mean(s[~inside])}


def _array(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan
