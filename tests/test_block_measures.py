"""The block-structure measures of Nguyen, Raghu & Kornblith (ICLR 2021) (cltunnel.measures.blocks) and the
vectorised minibatch CKA under them (cltunnel.measures.similarity), on constructions with known answers: the
whole-set first PCs against numpy's SVD, the pooled share, the upper-half CKA and ReLU sparsity by hand."""
import itertools
import math

import numpy as np
import pytest
import torch

from cltunnel.measures import similarity
from cltunnel.measures.blocks import (BLOCK_MIN_LAYERS, BLOCK_THRESHOLD, BlockStats, ReluSparsity, WholeSetPCs,
                                      block_summary, find_block, fit_whole_set_pcs, upper_half_cka)
from cltunnel.measures.similarity import CKAMatrix, _unbiased_hsic, cka_matrix, minibatch_cka


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _gram(x: torch.Tensor) -> torch.Tensor:
    return x @ x.T


def _cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of one minibatch through the streamed matrix."""
    acc = CKAMatrix()
    acc.add([x, y])
    return acc.matrix()[0, 1].item()


def _hsic_by_definition(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), Nguyen et al. (2021) §3: the unbiased HSIC is the U-statistic of
    E[k(x,x') l(y,y')] + E[k(x,x')] E[l(y,y')] - 2 E[k(x,x') l(y,y'')], averaged over the ordered 4-tuples
    (i, j, q, r) of distinct rows: k_ij l_ij + k_ij l_qr - 2 k_ij l_iq."""
    n = len(k)
    i, j, q, r = np.array(list(itertools.permutations(range(n), 4))).T
    terms = k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
    return float(terms.sum() / (n * (n - 1) * (n - 2) * (n - 3)))


def test_one_minibatch_cka_is_the_u_statistic_of_its_definition():
    x = _randn(12, 5, seed=0) + 2.0  # uncentred: the estimator itself must not care
    y = x @ _randn(5, 7, seed=1) + 0.5 * _randn(12, 7, seed=2)
    kx, ky = _gram(x).numpy(), _gram(y).numpy()
    xy, xx, yy = _hsic_by_definition(kx, ky), _hsic_by_definition(kx, kx), _hsic_by_definition(ky, ky)
    expected = xy / math.sqrt(xx * yy)
    hsic = similarity._hsic_matrix([_gram(x), _gram(y)])
    assert hsic[0, 1].item() == pytest.approx(xy, rel=1e-10)
    assert hsic[0, 0].item() == pytest.approx(xx, rel=1e-10) and hsic[1, 1].item() == pytest.approx(yy, rel=1e-10)
    assert _unbiased_hsic(_gram(x), _gram(y)).item() == pytest.approx(xy, rel=1e-10)  # the reference, too
    assert _cka(x, y) == pytest.approx(expected, rel=1e-10)
    assert minibatch_cka([(x, y)]) == pytest.approx(expected, rel=1e-10)
    assert 0.3 < expected < 0.99  # a value that tells the terms apart


def test_unbiased_cka_approaches_the_biased_full_batch_cka_for_many_rows():
    x = _randn(2000, 10, seed=3)
    y = torch.tanh(x @ _randn(10, 20, seed=4)) + _randn(2000, 20, seed=5)
    xc, yc = (x - x.mean(0)).numpy(), (y - y.mean(0)).numpy()
    biased = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    unbiased = _cka(x, y)
    assert 0.2 < unbiased < 0.9
    assert unbiased == pytest.approx(biased, abs=0.02)


def test_cka_invariances_rotation_isotropic_scale_translation_but_not_anisotropic_scale():
    x = _randn(300, 10, seed=6)  # more rows than features: a rotation is not trivially absorbed
    y = torch.tanh(x @ _randn(10, 12, seed=7)) + 0.5 * _randn(300, 12, seed=8)
    base = _cka(x, y)
    assert 0.3 < base < 0.95
    q = torch.linalg.qr(_randn(10, 10, seed=9))[0]
    assert _cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)
    assert _cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert _cka(x, 3.7 * x) == pytest.approx(1.0, abs=1e-10)
    assert _cka(3.7 * x, y) == pytest.approx(base, abs=1e-10)
    offset = 50.0 * _randn(10, seed=10)  # far from 0, like ReLU outputs: the HSIC's terms cancel 8 digits
    assert _cka(x + offset, y) == pytest.approx(base, abs=1e-10)
    stretch = torch.diag(torch.tensor([10.0] + [1.0] * 9, dtype=torch.float64))
    assert _cka(x, x @ stretch) < 0.9
    assert abs(_cka(x @ stretch, y) - base) > 0.01


@pytest.mark.parametrize("chunk_elements", [None, 2 * 2 * 50 * 50])
def test_vectorised_cka_matrix_equals_the_pairwise_loop(monkeypatch, chunk_elements):
    """Several minibatches of different sizes, seven representations of different widths and means and a
    symmetric Gram that is not positive semi-definite; with and without chunks of layers (two layers of 50
    rows, one of 64 or 81, an uneven last chunk)."""
    if chunk_elements is not None:
        monkeypatch.setattr(similarity, "HSIC_CHUNK_ELEMENTS", chunk_elements)
    batches = []
    for b, n in enumerate((50, 64, 81)):
        grams = [_gram(_randn(n, d, seed=100 * b + d) + 0.5 * (d % 3)) for d in (3, 8, 20, 5, 40, 11)]
        r = _randn(n, n, seed=100 * b + 99)
        batches.append(grams + [r + r.T])
    acc = CKAMatrix()
    for grams in batches:
        acc.add_grams(grams)
    loop = torch.zeros(7, 7, dtype=torch.float64)
    for grams in batches:
        loop += torch.tensor([[_unbiased_hsic(k, l).item() for l in grams] for k in grams], dtype=torch.float64)
    scale = loop.diag().sqrt()
    assert ((acc.hsic - loop).abs() / (scale[:, None] * scale[None, :])).max() < 1e-12
    assert torch.allclose(acc.matrix(), loop / (scale[:, None] * scale[None, :]), rtol=0, atol=1e-12)
    assert torch.allclose(cka_matrix(batches), acc.matrix(), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="holds 7 representations"):
        acc.add_grams(batches[0][:3])


def _two_pc_features(n: int, s1: float, s2: float, seed: int, d: int = 15, noise: float = 0.0
                     ) -> tuple[torch.Tensor, float]:
    """Features s1·a·u1ᵀ + s2·b·u2ᵀ (+ noise) with a, b centred and orthogonal in sample space, u1, u2
    orthonormal directions, plus a constant offset row that only the centring takes off; and the first PC's
    exact share of variance, s1²‖a‖² / (s1²‖a‖² + s2²‖b‖²)."""
    a, b = _randn(n, seed=seed), _randn(n, seed=seed + 1)
    a, b = a - a.mean(), b - b.mean()
    b = b - (b @ a) / (a @ a) * a
    u = torch.linalg.qr(_randn(d, d, seed=seed + 2))[0]
    x = s1 * torch.outer(a, u[:, 0]) + s2 * torch.outer(b, u[:, 1]) + noise * _randn(n, d, seed=seed + 3)
    va, vb = s1 ** 2 * (a @ a).item(), s2 ** 2 * (b @ b).item()
    return x + 5.0 * _randn(d, seed=seed + 4), max(va, vb) / (va + vb)


def _whole_set(features: list[torch.Tensor], parts: list[slice], targets: list[list[int]] | None = None,
               tolerance: float = 1e-12) -> WholeSetPCs:
    """The streamed protocol on features held in memory: the moments pass, then the iterations."""
    pcs = WholeSetPCs(targets or [[i] for i in range(len(features))], len(features[0]))

    def sweep() -> None:
        for part in parts:
            for i, f in enumerate(features):
                pcs.visit(i, part, f[part])

    sweep()
    fit_whole_set_pcs([pcs], sweep, 300, tolerance)
    return pcs


def _stats(features: list[torch.Tensor], parts: list[slice]) -> BlockStats:
    """BlockStats as the analysis fills them: CKA, whole-set PCs, then the Grams less their first PC."""
    stats = BlockStats()
    for part in parts:
        stats.add_grams([_gram(f[part]) for f in features])
    stats.set_first_pcs(_whole_set(features, parts), list(range(len(features))))
    for part in parts:
        stats.add_grams_without_first_pc([_gram(f[part]) for f in features], part)
    return stats


def _numpy_pc(x: torch.Tensor) -> tuple[float, np.ndarray, float]:
    """(share, unit first PC over the rows, λ1 / λ2) of the centred features, by numpy's SVD."""
    a = x.flatten(1).numpy()
    u, s, _ = np.linalg.svd(a - a.mean(0), full_matrices=False)
    return float(s[0] ** 2 / (s ** 2).sum()), u[:, 0], float(s[0] ** 2 / s[1] ** 2)


def test_whole_set_first_pc_equals_numpy_svd_and_differs_from_each_minibatch_pc():
    """A close second PC (λ1 ≈ 1.1·λ2, as in the runs) over four minibatches: the streamed PC is numpy's over
    all rows; the PC of each minibatch is not (the approximation issue 33 removed)."""
    scale = torch.cat([torch.tensor([1.05, 1.0]), torch.linspace(0.6, 0.05, 28)]).double()
    x = _randn(400, 30, seed=80) * scale + 3.0
    parts = [slice(a, a + 100) for a in range(0, 400, 100)]
    pcs = _whole_set([x], parts)
    share, u1, ratio = _numpy_pc(x)
    assert 1.0 < ratio < 1.3
    assert pcs.share()[0].item() == pytest.approx(share, abs=1e-10)
    assert abs(u1 @ pcs.u1[0].numpy()) == pytest.approx(1.0, abs=1e-9)
    assert pcs.residual.max() < 1e-12 and pcs.iterations < 300
    per_batch = [_numpy_pc(x[p]) for p in parts]
    pooled_batch_share = sum(s * float(((x[p] - x[p].mean(0)) ** 2).sum()) for (s, _, _), p in zip(per_batch, parts)
                             ) / sum(float(((x[p] - x[p].mean(0)) ** 2).sum()) for p in parts)
    assert abs(pooled_batch_share - share) > 1e-3  # Σλ1 / Σtrace over minibatches, the old estimate
    for (_, u, _), p in zip(per_batch, parts):  # each minibatch's PC is not the whole set's restricted to it
        whole = pcs.u1[0][p].numpy()
        assert abs(u @ whole) / np.linalg.norm(whole) < 0.999


def test_pooled_share_is_the_first_pc_of_the_concatenated_features():
    """Two representations of different widths and scales, pooled: numpy's first PC of their concatenation."""
    x = _randn(120, 6, seed=81) * torch.linspace(2.0, 0.2, 6, dtype=torch.float64)
    y = _randn(120, 2, 3, seed=82) * 1.5 + 4.0  # a feature map: flattened, as the analysis's features are
    pcs = _whole_set([x, y], [slice(0, 60), slice(60, 120)], [[0], [1], [0, 1]])
    share, _, _ = _numpy_pc(torch.cat([x, y.flatten(1)], 1))
    assert pcs.share()[2].item() == pytest.approx(share, abs=1e-10)
    assert pcs.share()[0].item() == pytest.approx(_numpy_pc(x)[0], abs=1e-10)
    assert pcs.share()[1].item() == pytest.approx(_numpy_pc(y)[0], abs=1e-10)
    assert pcs.trace()[2].item() == pytest.approx((pcs.trace()[0] + pcs.trace()[1]).item(), rel=1e-12)
    with pytest.raises(ValueError, match="more than 8 rows"):
        WholeSetPCs([[0]], 8)


def test_first_pc_share_on_known_low_rank_constructions():
    x, share = _two_pc_features(80, 3.0, 1.0, seed=20, noise=1e-9)  # the noise moves the share ~1e-10
    assert 0.7 < share < 0.97
    assert _stats([x], [slice(0, 80)]).first_pc_share()[0].item() == pytest.approx(share, abs=1e-8)
    rank1, _ = _two_pc_features(80, 3.0, 0.0, seed=30, noise=1e-9)
    assert _stats([rank1], [slice(0, 80)]).first_pc_share()[0].item() == pytest.approx(1.0, abs=1e-9)
    d = 20
    iso = _randn(500, d, seed=40)
    assert 1 / d <= _stats([iso], [slice(0, 250), slice(250, 500)]).first_pc_share()[0].item() < 3 / d


def test_removing_the_first_pc_leaves_the_rest_of_the_cka():
    """Removing the first PC is the CKA of the features with their whole-set first PC projected out (numpy)."""
    x, _ = _two_pc_features(120, 3.0, 1.0, seed=50, noise=0.3)
    y = x @ _randn(15, 10, seed=51) + _randn(120, 10, seed=52)
    parts = [slice(0, 60), slice(60, 120)]
    stats = _stats([x, y], parts)

    def projected(f: torch.Tensor) -> torch.Tensor:
        a = f - f.mean(0)
        _, _, vt = torch.linalg.svd(a, full_matrices=False)
        return a - torch.outer(a @ vt[0], vt[0])

    direct = CKAMatrix()
    for part in parts:
        direct.add([projected(x)[part], projected(y)[part]])
    assert torch.allclose(stats.cka_without_first_pc(), direct.matrix(), atol=1e-9)
    assert not torch.allclose(stats.cka_without_first_pc(), stats.cka(), atol=1e-3)


def test_cka_carried_by_one_shared_component_vanishes_without_the_first_pc():
    """X and Y share only a dominant component (Nguyen et al. §5): high CKA, which removing the first PC
    takes away, and first-PC scores that agree."""
    z = _randn(400, seed=60)
    vx, vy = _randn(30, seed=61), _randn(40, seed=63)
    x = 10.0 * torch.outer(z, vx / vx.norm()) + _randn(400, 30, seed=62)  # the component: 100 of 130 variance
    y = 10.0 * torch.outer(z, vy / vy.norm()) + _randn(400, 40, seed=64)
    stats = _stats([x, y], [slice(0, 200), slice(200, 400)])
    assert stats.cka()[0, 1].item() > 0.9
    assert abs(stats.cka_without_first_pc()[0, 1].item()) < 0.1
    assert stats.pc_cos2()[0, 1].item() > 0.95
    assert (stats.first_pc_share() > 0.65).all()


def test_pc_cos2_is_the_squared_correlation_of_whole_set_scores():
    x = _randn(150, 12, seed=70) * torch.linspace(3.0, 0.5, 12, dtype=torch.float64)  # a clear first PC
    rotated = 2.0 * x @ torch.linalg.qr(_randn(12, 12, seed=71))[0] + 7.0  # same scores, up to scale
    other = _randn(150, 9, seed=72)
    parts = [slice(0, 60), slice(60, 150)]
    stats = _stats([x, rotated, other], parts)
    cos2 = stats.pc_cos2()
    assert torch.allclose(cos2.diag(), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert cos2[0, 1].item() == pytest.approx(1.0, abs=1e-10)
    u_x, u_other = _numpy_pc(x)[1], _numpy_pc(other)[1]
    assert cos2[0, 2].item() == pytest.approx(float(u_x @ u_other) ** 2, abs=1e-9)
    assert cos2[0, 2].item() < 0.2
    assert torch.allclose(stats.cka(), cka_matrix([[_gram(f[p]) for f in (x, rotated, other)] for p in parts]),
                          rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="at least 50 rows"):
        stats.add_grams([_gram(f[:49]) for f in (x, rotated, other)])


def test_upper_half_cka_is_the_mean_over_the_later_half_off_the_diagonal():
    m = np.arange(25, dtype=float).reshape(5, 5) / 100
    m = (m + m.T) / 2 + np.eye(5) * 0.5
    found = upper_half_cka(m, 1 - m)
    later = [m[i, j] for i in (2, 3, 4) for j in (2, 3, 4) if i != j]  # the last ceil(5 / 2) = 3
    assert found["upper_half_cka"] == pytest.approx(np.mean(later))
    assert found["upper_half_cka_without_first_pc"] == pytest.approx(1 - np.mean(later))
    assert math.isnan(upper_half_cka(np.eye(1), np.eye(1))["upper_half_cka"])


def test_relu_sparsity_of_a_known_tensor():
    """Units: one always zero, one never zero, one zero on 1 of 4 rows; over two minibatches."""
    out = torch.relu(torch.tensor([[-1.0, 2.0, 0.5], [-2.0, 1.0, -0.5], [-1.0, 3.0, 1.0], [-3.0, 0.1, 2.0]]))
    relus = ReluSparsity()
    relus.add(0, out[:2])
    relus.add(0, out[2:])
    shares = relus.shares(0)
    assert shares["zero_share"] == pytest.approx(5 / 12)  # np.mean(act == 0), the reference code's sparsity
    assert shares["dead_unit_share"] == pytest.approx(1 / 3)
    assert shares["always_active_unit_share"] == pytest.approx(1 / 3)


def _blocky(size: int, runs: list[tuple[int, int]], inside: float = 0.95, outside: float = 0.2) -> np.ndarray:
    m = np.full((size, size), outside)
    for i, j in runs:
        m[i:j + 1, i:j + 1] = inside
    np.fill_diagonal(m, 1.0)
    return m


def test_find_block_on_hand_made_matrices():
    assert (BLOCK_THRESHOLD, BLOCK_MIN_LAYERS) == (0.9, 3)
    assert find_block(_blocky(6, [(2, 4)])) == (2, 4)
    assert find_block(torch.tensor(_blocky(6, [(2, 4)]))) == (2, 4)  # a tensor as well as an array
    assert find_block(_blocky(7, [(0, 2), (4, 6)])) == (0, 2)  # equally long: the earliest
    assert find_block(_blocky(7, [(0, 2), (3, 6)])) == (3, 6)  # the longest, not the first
    assert find_block(_blocky(6, [(1, 2)])) is None  # two layers are no block
    assert find_block(_blocky(6, [(1, 2)]), min_layers=2) == (1, 2)
    assert find_block(_blocky(6, [(2, 4)], inside=BLOCK_THRESHOLD)) == (2, 4)  # exactly the threshold counts
    just_below = _blocky(6, [(2, 4)], inside=BLOCK_THRESHOLD)
    just_below[2, 4] = just_below[4, 2] = np.nextafter(BLOCK_THRESHOLD, 0.0)
    assert find_block(just_below) is None
    chain = _blocky(5, [(0, 1), (1, 2), (2, 3)])  # neighbours alike, layers 0 and 3 not: every pair counts
    chain[0, 2] = chain[2, 0] = chain[1, 3] = chain[3, 1] = 0.95
    assert find_block(chain) == (0, 2)
    dead = _blocky(6, [(0, 5)])
    dead[2, :] = dead[:, 2] = np.nan  # a constant layer: no CKA, no block through it
    assert find_block(dead) == (3, 5)
    assert find_block(dead, min_layers=4) is None


def test_block_summary_means_in_and_out_of_the_block():
    cka = _blocky(5, [(1, 3)], inside=0.95, outside=0.3)
    no_pc = _blocky(5, [(1, 3)], inside=0.1, outside=0.3)
    no_pc[1, 2] = no_pc[2, 1] = 0.4  # mean of the six off-diagonal entries: (2·0.4 + 4·0.1) / 6 = 0.2
    share = np.array([0.2, 0.8, 0.9, 0.7, 0.4])
    summary = block_summary(torch.tensor(cka), no_pc, torch.tensor(share), (1, 3))
    assert summary == pytest.approx({"cka_in_block": 0.95, "cka_in_block_without_first_pc": 0.2,
                                     "first_pc_share_in_block": 0.8, "first_pc_share_out_of_block": 0.3})
    none = block_summary(cka, no_pc, share, None)
    assert math.isnan(none["cka_in_block"]) and math.isnan(none["first_pc_share_in_block"])
    assert none["first_pc_share_out_of_block"] == pytest.approx(share.mean())
    one = block_summary(cka, no_pc, share, (2, 2))
    assert math.isnan(one["cka_in_block"]) and one["first_pc_share_in_block"] == pytest.approx(0.9)
    assert math.isnan(block_summary(cka, no_pc, share, (0, 4))["first_pc_share_out_of_block"])
