"""The block structure of Nguyen, Raghu & Kornblith (ICLR 2021), "Do Wide and Deep Networks Learn the Same
Things?", as pure tensor maths on per-minibatch Gram matrices and features (no models, no data).

A *block* is a long run of consecutive layers whose representations are all alike (minibatch CKA, §2; the
block structure, §3, Figures 1-2); the paper shows that it is carried by a dominant first principal component:
inside the block the first PC explains most of the variance, the layers share it, and removing it removes
most of their similarity (§4.1, Figure 3). :class:`WholeSetPCs` finds the first PCs over the whole set
(streamed), :class:`BlockStats` measures these three things; :func:`find_block`, :func:`block_summary` and
:func:`upper_half_cka` read a block off the results; :class:`ReluSparsity` checks that the layers inside a
block still act nonlinearly (Appendix D.6).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from cltunnel.measures.similarity import CKA_MIN_ROWS, CKAMatrix

# A block: at least BLOCK_MIN_LAYERS consecutive layers whose CKA with one another is at least
# BLOCK_THRESHOLD, every pair of them. The paper reads its blocks off the heatmaps by eye (§3); these make
# "a large, contiguous set of layers with very similar representations" a rule one can test.
BLOCK_THRESHOLD = 0.9
BLOCK_MIN_LAYERS = 3


PC_SUBSPACE = 8  # vectors iterated together: the first PC converges at the rate λ9/λ1, not λ2/λ1 (λ1 ≈ 1.1·λ2 occurs)


class WholeSetPCs:
    """The first principal component of each *target* over every row of a data set, streamed over minibatches
    (Nguyen et al.'s PCA is over the whole test set, §4.1, Appendix D.5). A target is one representation, or
    several concatenated along their features (the paper's first PC of "activations combined from the last 2
    stages", Figure D.5): concatenation sums their Gram matrices, so a pooled share weighs each member by its
    variance, as the concatenated activations do.

    Neither the features (rows x features per representation) nor the whole-set Gram (rows²) need fit in
    memory: subspace iteration on the centred Gram K = X̃X̃ᵀ in sample space keeps, per target, ``PC_SUBSPACE``
    vectors over the rows (U, n x 8) and, per member, X̃ᵀU (features x 8). One iteration is two passes over the
    data, each calling :meth:`visit` for every representation of every minibatch:

    - ``phase = "moments"`` (once, first): the features' sums, for the whole-set mean and total variance;
    - ``"transpose"``: W_m += X̃_bᵀ U_b for each member m; ``"product"``: P_b += Σ_m X̃_b W_m, so P = K U;

    then :meth:`step`: Rayleigh-Ritz on span(U) gives λ1 and u1, the residual ‖K u1 - λ1 u1‖ / λ1 says whether
    u1 has converged, and U <- orth(P). ``sin`` of u1's error is at most the residual over the relative gap
    (λ1 - λ2) / λ1. Everything is float64."""

    def __init__(self, targets: list[list[int]], rows: int, seed: int = 0) -> None:
        if rows < PC_SUBSPACE + 1:
            raise ValueError(f"whole-set PCs need more than {PC_SUBSPACE} rows, got {rows}")
        self.targets = targets
        self.rows = rows
        self.seed = seed
        self.phase = "moments"
        self.iterations = 0
        self.sums: dict[int, torch.Tensor] = {}  # representation -> Σ rows of its flattened features
        self.squares: dict[int, float] = {}  # representation -> Σ of its squared features
        self.seen: dict[int, int] = {}  # representation -> rows visited in the moments pass
        self.u: list[torch.Tensor] = []  # per target: U (rows x PC_SUBSPACE), orthonormal columns
        self.w: list[dict[int, torch.Tensor]] = []  # per target, per member: X̃ᵀU
        self.p: list[torch.Tensor] = []  # per target: K U
        self.lambda1 = torch.full((len(targets),), math.nan, dtype=torch.float64)
        self.u1: list[torch.Tensor | None] = [None] * len(targets)  # per target: unit first PC over the rows
        self.residual = torch.full((len(targets),), math.inf, dtype=torch.float64)
        self._of: dict[int, list[int]] = {}  # representation -> the targets it is a member of
        for t, members in enumerate(targets):
            for m in members:
                self._of.setdefault(m, []).append(t)

    def visit(self, rep: int, rows: slice, features: torch.Tensor) -> None:
        """One representation's features (rows x ...) of the minibatch ``rows`` of the data set, in this phase."""
        if rep not in self._of:
            return
        x = features.flatten(1).double()
        if self.phase == "moments":
            self.sums[rep] = x.sum(0) + self.sums.get(rep, 0)
            self.squares[rep] = float((x * x).sum()) + self.squares.get(rep, 0.0)
            self.seen[rep] = self.seen.get(rep, 0) + len(x)
            return
        x = x - self.sums[rep] / self.rows
        for t in self._of[rep]:
            if self.phase == "transpose":
                self.w[t][rep] = self.w[t][rep] + x.T @ self.u[t][rows]
            else:
                self.p[t][rows] += x @ self.w[t][rep]

    def trace(self) -> torch.Tensor:
        """(T,) total variance of each target over the rows (Σ of squared centred features, not / n)."""
        per_rep = {r: self.squares[r] - float(self.sums[r] @ self.sums[r]) / self.rows for r in self.sums}
        return torch.tensor([sum(per_rep[m] for m in members) for members in self.targets], dtype=torch.float64)

    def start(self) -> None:
        """After the moments pass: random orthonormal starting vectors, the first transpose pass next."""
        short = {r: n for r, n in self.seen.items() if n != self.rows}
        if short or len(self.seen) != len(self._of):
            raise ValueError(f"the moments pass saw {self.seen} rows per representation, not {self.rows} each")
        device = next(iter(self.sums.values())).device
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        self.u = [torch.linalg.qr(torch.randn(self.rows, PC_SUBSPACE, generator=g, dtype=torch.float64))[0]
                  .to(device) for _ in self.targets]
        self._clear()

    def _clear(self) -> None:
        self.w = [{m: torch.zeros(len(self.sums[m]), PC_SUBSPACE, dtype=torch.float64, device=u.device)
                   for m in members} for members, u in zip(self.targets, self.u)]
        self.p = [torch.zeros_like(u) for u in self.u]
        self.phase = "transpose"

    def step(self) -> float:
        """After a product pass: Rayleigh-Ritz, the new U, and the largest residual over the targets."""
        for t, (u, p) in enumerate(zip(self.u, self.p)):
            values, vectors = torch.linalg.eigh((u.T @ p + p.T @ u) / 2)
            values, vectors = values.flip(0), vectors.flip(1)  # largest first
            top = u @ vectors[:, 0]
            self.lambda1[t] = values[0].item()
            self.u1[t] = top * torch.sign(top[top.abs().argmax()])  # sign fixed for reproducibility only
            scale = max(values[0].item(), torch.finfo(torch.float64).tiny)
            self.residual[t] = (p @ vectors[:, 0] - values[0] * top).norm().item() / scale
            self.u[t] = torch.linalg.qr(p @ vectors)[0]  # columns in Ritz order: the first stays the best
        self.iterations += 1
        self._clear()
        return float(self.residual.max())

    def share(self) -> torch.Tensor:
        """(T,) share of variance the first PC explains, λ1 / trace; NaN for a constant target."""
        return self.lambda1 / self.trace()

    def scores(self, target: int) -> torch.Tensor:
        """(rows,) every row's score on a target's first PC, X̃v1 = sqrt(λ1)·u1 (centred over the rows)."""
        return self.u1[target] * math.sqrt(max(self.lambda1[target].item(), 0.0))


def fit_whole_set_pcs(pcs: list[WholeSetPCs], sweep: Callable[[], None], iterations: int, tolerance: float) -> None:
    """After the moments pass: subspace iterations of every :class:`WholeSetPCs` in ``pcs`` together, each two
    calls of ``sweep`` (one pass over the data calling every ``visit``), until every first PC's residual is under
    ``tolerance`` or ``iterations`` are done."""
    for p in pcs:
        p.start()
    for _ in range(iterations):
        for phase in ("transpose", "product"):
            for p in pcs:
                p.phase = phase
            sweep()
        if max([p.step() for p in pcs]) < tolerance:
            break


class BlockStats:
    """Per-representation first-PC statistics and CKA with and without the first PC, streamed over minibatches
    like :class:`~cltunnel.measures.similarity.CKAMatrix`: each minibatch's Grams are folded into sums and
    dropped. The CKA comes first (:meth:`add_grams`, the paper's minibatch estimator, §2); the first PCs are
    those of the whole set (:class:`WholeSetPCs`, given to :meth:`set_first_pcs`), and a second pass over the
    same minibatches folds each Gram with its representation's first PC removed (:meth:`add_grams_without_first_pc`)."""

    def __init__(self) -> None:
        self._cka = CKAMatrix()
        self._cka_no_pc = CKAMatrix()
        self.lambda1: torch.Tensor | None = None  # (L,) variance along each first PC (whole set)
        self.trace: torch.Tensor | None = None  # (L,) total variance (whole set)
        self.scores: torch.Tensor | None = None  # (L, rows) every row's score on each first PC

    def add_grams(self, grams: list[torch.Tensor]) -> None:
        """One minibatch: the L representations' uncentred Grams (n x n, float64) of the same n rows."""
        if grams[0].shape[0] < CKA_MIN_ROWS:
            raise ValueError(f"a CKA minibatch needs at least {CKA_MIN_ROWS} rows, got {grams[0].shape[0]}")
        self._cka.add_grams(grams)

    def set_first_pcs(self, pcs: "WholeSetPCs", targets: list[int]) -> None:
        """The whole-set first PCs of the L representations: ``targets[i]`` is representation i's target in ``pcs``."""
        self.lambda1 = pcs.lambda1[targets].clone()
        self.trace = pcs.trace()[targets]
        self.scores = torch.stack([pcs.scores(t) for t in targets])

    def add_grams_without_first_pc(self, grams: list[torch.Tensor], rows: slice) -> None:
        """The same minibatches again (rows ``rows`` of the set): each Gram less its first PC's, G - s sᵀ with s
        the rows' scores. That is the Gram of the features with the whole-set first PC projected out, up to a
        translation of the features, which the unbiased HSIC does not see (§4.1, Figure 3)."""
        scores = self.scores[:, rows].to(grams[0].device)
        self._cka_no_pc.add_grams([g - torch.outer(s, s) for g, s in zip(grams, scores)])

    def cka(self) -> torch.Tensor:
        """(L, L) linear CKA, as :func:`~cltunnel.measures.similarity.cka_matrix` (§2)."""
        return self._cka.matrix()

    def cka_without_first_pc(self) -> torch.Tensor:
        """(L, L) linear CKA of the representations with each one's whole-set first PC removed (§4.1, Figure 3)."""
        return self._cka_no_pc.matrix()

    def first_pc_share(self) -> torch.Tensor:
        """(L,) share of variance the first PC explains, λ1 / trace over the whole set (§4.1); NaN for a
        constant representation."""
        return self.lambda1 / self.trace

    def pc_cos2(self) -> torch.Tensor:
        """(L, L) squared cosine similarity of two representations' first-PC scores over the whole set: whether
        they share their first PC (§4.1); sign-free, as PCs have no sign. The scores are centred, so this is
        their squared correlation."""
        s = self.scores @ self.scores.T
        norms = s.diag()
        return s ** 2 / (norms[:, None] * norms[None, :])


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


def upper_half_cka(cka: torch.Tensor | np.ndarray, cka_no_pc: torch.Tensor | np.ndarray) -> dict[str, float]:
    """A continuous reading beside the threshold rule: the mean off-diagonal CKA among the later half of the
    representations (the last ceil(L/2); the paper's blocks sit "mostly in the later layers", §3), with and
    without the first PC. The rule's yes/no can flip between seeds whose maps differ by a few hundredths; this
    moves by as much."""
    m, m_no_pc = _array(cka), _array(cka_no_pc)
    later = np.zeros(len(m), dtype=bool)
    later[len(m) // 2:] = True
    pairs = later[:, None] & later[None, :] & ~np.eye(len(m), dtype=bool)
    return {"upper_half_cka": _mean(m[pairs]), "upper_half_cka_without_first_pc": _mean(m_no_pc[pairs])}


class ReluSparsity:
    """How often ReLU outputs are zero, streamed over minibatches (Appendix D.6: inside a block, are the layers
    near-linear?). Per representation and per unit (a flattened feature: a channel at a position): how many rows
    give exactly 0. Read as the share of zero outputs (the reference code's sparsity, ``np.mean(act == 0)``),
    the share of units zero on every row (dead) and of units never zero (linear on this data)."""

    def __init__(self) -> None:
        self.zeros: dict[int, torch.Tensor] = {}  # representation -> (units,) rows with a zero output
        self.rows: dict[int, int] = {}

    def add(self, rep: int, outputs: torch.Tensor) -> None:
        zeros = (outputs.flatten(1) == 0).sum(0).cpu()
        self.zeros[rep] = zeros + self.zeros.get(rep, 0)
        self.rows[rep] = self.rows.get(rep, 0) + len(outputs)

    def shares(self, rep: int) -> dict[str, float]:
        """One representation's zero share, dead-unit share and always-active-unit share."""
        zeros, rows = self.zeros[rep].double(), self.rows[rep]
        return {"zero_share": float(zeros.mean() / rows), "dead_unit_share": float((zeros == rows).double().mean()),
                "always_active_unit_share": float((zeros == 0).double().mean())}
