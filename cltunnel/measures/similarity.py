"""Representation similarity and geometry, as pure tensor maths: numerical rank, (minibatch) CKA,
intra- and inter-class variance.
"""
from __future__ import annotations


import torch


def numerical_rank(features: torch.Tensor, rel_threshold: float = 1e-3, max_features: int = 8000,
                   seed: int = 0) -> int:
    """Eigenvalues of the sample covariance above λ1·threshold; a random subset of 8,000 features for wider
    layers (thesis §1). The eigenvalues come from the smaller of the centred features' two Gram matrices
    (rows x rows or features x features, float64): the same non-zero eigenvalues as the squared singular
    values, at about a tenth of an SVD's cost on 2,000 x 8,000 (1.6 s against 12 s on a 2-core CPU)."""
    f = features.flatten(1).double()
    if f.shape[1] > max_features:
        g = torch.Generator(device="cpu").manual_seed(seed)
        f = f[:, torch.randperm(f.shape[1], generator=g)[:max_features].to(f.device)]
    f = f - f.mean(0, keepdim=True)
    gram = f.T @ f if f.shape[0] > f.shape[1] else f @ f.T
    s = torch.linalg.eigvalsh(gram).flip(0)  # covariance eigenvalues up to the 1/(N-1) factor, largest first
    return int((s > rel_threshold * s[0]).sum().item()) if s[0] > 0 else 0


def _unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    k = k.clone().fill_diagonal_(0)
    l = l.clone().fill_diagonal_(0)
    ones = torch.ones(n, 1, dtype=k.dtype, device=k.device)
    trace = (k * l).sum()
    middle = (ones.T @ k @ ones) * (ones.T @ l @ ones) / ((n - 1) * (n - 2))
    last = 2 / (n - 2) * (ones.T @ k @ l @ ones)
    return ((trace + middle - last) / (n * (n - 3))).squeeze()


HSIC_CHUNK_ELEMENTS = 2 ** 26  # float64 elements (512 MB) of stacked flattened Grams held at once


def _hsic_matrix(grams: list[torch.Tensor]) -> torch.Tensor:
    """Unbiased HSIC (:func:`_unbiased_hsic` is the reference) between every pair of ``grams`` (symmetric n x n,
    one minibatch) in a few matrix products instead of L²/2 calls. With G~ a Gram with zeroed diagonal:
    tr(K~L~) for all pairs is F Fᵀ, F the stack of the flattened G~; 1ᵀK~L~1 = r_K · r_L with r the row sums
    of G~; 1ᵀK~1 is the sum of r.

    Each Gram is first centred (H G H): the unbiased HSIC does not change under G -> G + a1ᵀ + 1aᵀ, which
    covers translating the features and centring the Gram, but its terms cancel as the features' mean grows
    (features of mean 30 and unit spread lost eight digits uncentred, ReLU outputs sit far from 0). F is one
    stack up to HSIC_CHUNK_ELEMENTS elements (200 layers of 500 rows: 400 MB), above that chunks of layers
    of half as many, two at a time."""
    layers, n = len(grams), grams[0].shape[0]
    per_chunk = layers if layers * n * n <= HSIC_CHUNK_ELEMENTS else max(1, HSIC_CHUNK_ELEMENTS // (2 * n * n))

    def flat(a: int) -> torch.Tensor:
        f = torch.stack(grams[a:a + per_chunk]).double()
        f = f.sub_(f.mean(1, keepdim=True)).sub_(f.mean(2, keepdim=True)).reshape(-1, n * n)
        f[:, ::n + 1] = 0  # the diagonal of every Gram
        return f

    trace = torch.empty(layers, layers, dtype=torch.float64, device=grams[0].device)
    rows = torch.empty(layers, n, dtype=torch.float64, device=grams[0].device)
    for a in range(0, layers, per_chunk):
        fa = flat(a)
        rows[a:a + per_chunk] = fa.reshape(-1, n, n).sum(2)
        for b in range(a, layers, per_chunk):
            block = fa @ (fa if b == a else flat(b)).T
            trace[a:a + per_chunk, b:b + per_chunk] = block
            trace[b:b + per_chunk, a:a + per_chunk] = block.T
    total = rows.sum(1)
    middle = total[:, None] * total[None, :] / ((n - 1) * (n - 2))
    last = 2 / (n - 2) * (rows @ rows.T)
    return (trace + middle - last) / (n * (n - 3))


CKA_MIN_ROWS = 50  # no CKA minibatch smaller: the unbiased HSIC needs 4 rows, and its spread grows as rows shrink


def cka_batches(n: int, batch_size: int) -> list[slice]:
    """The one minibatch rule of every CKA path: ``n`` rows cut into ``max(1, n // batch_size)`` contiguous
    batches whose sizes differ by at most one, so every batch has at least ``batch_size`` rows (or all ``n``)
    and every row weighs the same in the sum of HSICs. (n = 5,000 at 500 gives ten batches of 500, as
    before; 515 rows give one batch, not 500 + a 15-row batch of ~9x the spread.)"""
    if n < CKA_MIN_ROWS:
        raise ValueError(f"CKA needs at least {CKA_MIN_ROWS} rows, got {n}")
    count = max(1, n // batch_size)
    bounds = [round(i * n / count) for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def gram_matrix(f: torch.Tensor) -> torch.Tensor:
    """The linear kernel of a minibatch's representations (rows x rows, float64): what every CKA path keeps
    of a layer instead of its features."""
    f = f.flatten(1).double()
    return f @ f.T



class PairedCKA:
    """Linear CKA between matching representations (layer k of two models), streamed over minibatches:
    per pair only the three HSIC sums are kept, never the features."""

    def __init__(self) -> None:
        self.sums: dict[object, list[torch.Tensor]] = {}

    def add(self, key: object, x: torch.Tensor, y: torch.Tensor) -> None:
        hsic = _hsic_matrix([gram_matrix(x), gram_matrix(y)]).cpu()
        terms = [hsic[0, 1], hsic[0, 0], hsic[1, 1]]
        old = self.sums.get(key)
        self.sums[key] = terms if old is None else [a + b for a, b in zip(old, terms)]

    def values(self) -> dict[object, float]:
        return {key: float(xy / torch.sqrt(xx * yy)) for key, (xy, xx, yy) in self.sums.items()}


def minibatch_cka(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Linear CKA from minibatches (X_i, Y_i) with the unbiased HSIC estimator, summed over minibatches then
    normalised (Nguyen et al. 2021)."""
    acc = PairedCKA()
    for x, y in pairs:
        acc.add(0, x, y)
    return acc.values()[0]


class CKAMatrix:
    """Representation x representation linear CKA, streamed: each minibatch's Gram matrices are folded into
    the HSIC sums and dropped (all pairs at once, :func:`_hsic_matrix`)."""

    def __init__(self) -> None:
        self.hsic: torch.Tensor | None = None

    def add(self, features: list[torch.Tensor]) -> None:
        self.add_grams([gram_matrix(f) for f in features])

    def add_grams(self, grams: list[torch.Tensor]) -> None:
        if self.hsic is not None and self.hsic.shape[0] != len(grams):
            raise ValueError(f"CKAMatrix holds {self.hsic.shape[0]} representations, this minibatch {len(grams)}")
        hsic = _hsic_matrix(grams).cpu()
        self.hsic = hsic if self.hsic is None else self.hsic + hsic

    def matrix(self) -> torch.Tensor:
        hsic = torch.triu(self.hsic) + torch.triu(self.hsic, 1).T
        diag = hsic.diag().sqrt()
        return hsic / (diag[:, None] * diag[None, :])


def cka_matrix(gram_batches: list[list[torch.Tensor]]) -> torch.Tensor:
    """Layer x layer linear CKA from per-minibatch Gram matrices (one list of L Grams per minibatch)."""
    acc = CKAMatrix()
    for grams in gram_batches:
        acc.add_grams(grams)
    return acc.matrix()


def class_variance(features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(intra, inter): mean within-class squared distance to the class mean; mean squared distance
    between class means over ordered pairs of distinct classes (thesis §1)."""
    f = features.flatten(1).double()
    classes = torch.unique(labels)
    means = torch.stack([f[labels == c].mean(0) for c in classes])
    intra = torch.stack([((f[labels == c] - means[i]) ** 2).sum(1).mean() for i, c in enumerate(classes)]).mean()
    d = torch.cdist(means, means) ** 2
    c = len(classes)
    inter = d.sum() / (c * (c - 1)) if c > 1 else torch.tensor(0.0)
    return float(intra), float(inter)
