"""Representation similarity and geometry, as pure tensor maths: numerical rank, (minibatch) CKA,
intra- and inter-class variance.
"""
from __future__ import annotations


import torch


def numerical_rank(features: torch.Tensor, rel_threshold: float = 1e-3, max_features: int = 8000,
                   seed: int = 0) -> int:
    """Singular values of the sample covariance above σ1·threshold; a random subset of 8,000 features
    for wider layers (thesis §1)."""
    f = features.flatten(1).double()
    if f.shape[1] > max_features:
        g = torch.Generator(device="cpu").manual_seed(seed)
        f = f[:, torch.randperm(f.shape[1], generator=g)[:max_features].to(f.device)]
    f = f - f.mean(0, keepdim=True)
    s = torch.linalg.svdvals(f) ** 2  # covariance eigenvalues up to the 1/(N-1) factor
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


def minibatch_cka(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Linear CKA from minibatches (X_i, Y_i) with the unbiased HSIC estimator (Nguyen et al. 2021)."""
    xy = xx = yy = 0.0
    for x, y in pairs:
        x, y = x.flatten(1).double(), y.flatten(1).double()
        kx, ky = x @ x.T, y @ y.T
        xy = xy + _unbiased_hsic(kx, ky)
        xx = xx + _unbiased_hsic(kx, kx)
        yy = yy + _unbiased_hsic(ky, ky)
    return float(xy / torch.sqrt(xx * yy))


def cka_matrix(gram_batches: list[list[torch.Tensor]]) -> torch.Tensor:
    """Layer × layer linear CKA from per-minibatch Gram matrices (one list of L Grams per minibatch)."""
    n_layers = len(gram_batches[0])
    hsic = torch.zeros(n_layers, n_layers, dtype=torch.float64)
    for grams in gram_batches:
        for i in range(n_layers):
            for j in range(i, n_layers):
                hsic[i, j] += _unbiased_hsic(grams[i], grams[j]).cpu()
    hsic = torch.triu(hsic) + torch.triu(hsic, 1).T
    diag = hsic.diag().sqrt()
    return hsic / (diag[:, None] * diag[None, :])


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
