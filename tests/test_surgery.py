"""Surgery identities on the layer abstraction, and the analysis metrics' defining properties."""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from cltunnel.measures.similarity import class_variance, minibatch_cka, numerical_rank
from cltunnel.measures.tunnel import tunnel_start
from cltunnel.models.zoo import build_model
from cltunnel.models.surgery import compose, heads_trained_after_their_task, task_heads


def trained_like(seed: int, name: str = "vgg11"):
    """A model with non-trivial weights and BatchNorm statistics (a few train-mode passes on noise)."""
    torch.manual_seed(seed)
    m = build_model(name, [5, 5], (3, 32, 32), width=0.125)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 3, 32, 32) * (1 + seed), 0)
    return m.eval()


@pytest.fixture(scope="module")
def pair():
    return trained_like(1), trained_like(2)


X = torch.randn(8, 3, 32, 32)


def test_compose_endpoints_and_self_composition_are_bitwise_identities(pair):
    m1, m2 = pair
    L = len(m1.body)
    assert torch.equal(compose(m1, m2, 0)(X, 0), m2(X, 0))
    assert torch.equal(compose(m1, m2, L, heads=m1.heads)(X, 1), m1(X, 1))
    for x in range(L + 1):
        assert torch.equal(compose(m1, m1, x)(X, 0), m1(X, 0))


def test_composed_forward_equals_a_manual_layer_by_layer_forward(pair):
    m1, m2 = pair
    for x in (1, 4, 7):
        h = X
        for k in range(len(m1.body)):
            h = (m1 if k < x else m2).body[k](h)
        assert torch.equal(compose(m1, m2, x)(X, 1), m2.heads["1"](h))


def test_bn_buffers_travel_with_their_layer_and_nothing_is_shared(pair):
    m1, m2 = pair
    c = compose(m1, m2, 3)
    assert torch.equal(c.body[0][1].running_mean, m1.body[0][1].running_mean)
    assert torch.equal(c.body[5][1].running_var, m2.body[5][1].running_var)
    assert not torch.equal(m1.body[0][1].running_mean, m2.body[0][1].running_mean)
    source_ptrs = {t.data_ptr() for m in pair for t in list(m.parameters()) + list(m.buffers())}
    assert not source_ptrs & {t.data_ptr() for t in list(c.parameters()) + list(c.buffers())}


def test_sources_unchanged_after_fine_tuning_a_composition(pair):
    m1, m2 = pair
    before = [copy.deepcopy(m.state_dict()) for m in pair]
    c = compose(m1, m2, 4).train()
    opt = torch.optim.SGD(c.parameters(), lr=0.5)
    for _ in range(3):
        loss = c(X, 0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for m, state in zip(pair, before):
        for key, value in m.state_dict().items():
            assert torch.equal(value, state[key]), key
    assert not torch.equal(c.body[0][0].weight, m1.body[0][0].weight)


def test_task_heads_take_head_t_from_the_later_of_its_task_and_the_top(pair):
    """Head t from M_max(t, top): on M1's top, M1's head 0 and M2's head 1 (M1's never trained); on M2's
    top, M2's heads for both tasks (M2's head 0 is what the accuracy matrix's row 2 used)."""
    m1, m2 = pair
    on_m1, on_m2 = task_heads([m1, m2], 0), task_heads([m1, m2], 1)
    assert torch.equal(on_m1["0"].weight, m1.heads["0"].weight)
    assert torch.equal(on_m1["1"].weight, m2.heads["1"].weight)
    assert torch.equal(on_m2["0"].weight, m2.heads["0"].weight)
    assert torch.equal(on_m2["1"].weight, m2.heads["1"].weight)
    assert heads_trained_after_their_task([m1, m2]) == [0]  # the fixture's two models differ everywhere
    assert heads_trained_after_their_task([m1, m1]) == []


def test_compose_refuses_different_architectures(pair):
    with pytest.raises(ValueError, match="different layers"):
        compose(pair[0], trained_like(3, "vgg13"), 2)
    with pytest.raises(ValueError, match="cannot cut a body of 10 layers at layer"):
        compose(pair[0], pair[1], 11)


# ------------------------------------------------------------------------------------- analysis metrics
def _batches(x, y, size=100):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def test_cka_identity_orthogonal_and_isotropic_scale_invariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 40, generator=g)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    assert minibatch_cka(_batches(x, x)) == pytest.approx(1.0, abs=1e-9)
    assert minibatch_cka(_batches(x, 3.7 * x @ q)) == pytest.approx(1.0, abs=1e-9)
    y = torch.randn(600, 40, generator=g)
    assert abs(minibatch_cka(_batches(x, y))) < 0.05  # independent: unbiased estimator centred on 0
    z = x @ torch.randn(40, 40, generator=g)  # a non-orthogonal map is not an invariance
    assert minibatch_cka(_batches(x, z)) < 0.99


def test_numerical_rank_of_constructed_low_rank_matrices_is_exact():
    g = torch.Generator().manual_seed(0)
    for r in (1, 5, 17):
        f = torch.randn(500, r, generator=g) @ torch.randn(r, 64, generator=g)
        assert numerical_rank(f) == r
    wide = torch.randn(300, 3, generator=g) @ torch.randn(3, 9000, generator=g)  # subset path (>8000 features)
    assert numerical_rank(wide) == 3


def test_tunnel_start_on_constructed_curves():
    curve = {1: 0.40, 2: 0.60, 3: 0.80, 4: 0.93, 5: 0.95, 6: 0.96, 7: 0.97}
    assert tunnel_start(curve, 0.95) == 4  # 0.93 >= 0.95 * 0.97 = 0.9215
    assert tunnel_start(curve, 0.98) == 6  # 0.95 < 0.98 * 0.97 = 0.9506, so layer 6 (0.96)
    flat = {k: 0.9 for k in range(1, 6)}
    assert tunnel_start(flat) == 1


def test_class_variance_matches_hand_computation():
    f = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [10.0, 4.0]])
    y = torch.tensor([0, 0, 1, 1])
    intra, inter = class_variance(f, y)
    assert intra == pytest.approx((1.0 + 4.0) / 2)  # class 0: mean dist^2 1; class 1: 4
    assert inter == pytest.approx(((9.0 ** 2 + 2.0 ** 2) * 2) / 2)


def test_kappa_is_the_first_layer_near_the_best_probe_over_depth():
    from cltunnel.measures.tunnel import kappa

    curve = {1: 0.5, 2: 0.7, 3: 0.895, 4: 0.90, 5: 0.88}
    assert kappa(curve, depth=6) == pytest.approx(3 / 6)  # 0.895 >= 0.99 * 0.90 = 0.891
    assert kappa(curve, depth=6, eta=1.0) == pytest.approx(4 / 6)


def test_cka_matrix_agrees_with_pairwise_cka_and_is_symmetric():
    from cltunnel.measures.similarity import cka_matrix

    g = torch.Generator().manual_seed(1)
    layers = [torch.randn(400, 30, generator=g)]
    layers.append(layers[0] @ torch.linalg.qr(torch.randn(30, 30, generator=g))[0] * 2.0)  # same up to rotation
    layers.append(torch.randn(400, 12, generator=g))
    grams = [[(l[i:i + 100].double() @ l[i:i + 100].double().T) for l in layers] for i in range(0, 400, 100)]
    m = cka_matrix(grams)
    assert torch.allclose(m, m.T) and torch.allclose(m.diag(), torch.ones(3, dtype=m.dtype))
    assert m[0, 1] == pytest.approx(1.0, abs=1e-9)
    assert m[0, 2] == pytest.approx(minibatch_cka([(a[i:i + 100], b[i:i + 100]) for a, b in [(layers[0], layers[2])]
                                                   for i in range(0, 400, 100)]), abs=1e-9)


def test_tables_keep_dotted_names_whole(tmp_path):
    import pandas as pd

    from cltunnel.reports.tables import write_table

    df = pd.DataFrame({"a": [1.0]})
    write_table(df, df * 0, 2, tmp_path / "split5_vgg13_w0.25_table", "t")
    write_table(df, df * 0, 2, tmp_path / "split5_vgg13_w0.25_cka", "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"split5_vgg13_w0.25_{kind}.{ext}" for kind in ("table", "cka") for ext in ("csv", "md", "tex"))


def test_swap_vs_k_reads_table_5_4_1_rows_off_the_substitution_curves():
    from cltunnel.experiments.analyses import swap_vs_k

    rows = []
    for x in range(4):  # a 3-layer body: x = 0..3
        for task in (1, 2):
            rows.append({"x": x, "direction": "M1[1:x]+M2[x+1:n]", "task": task, "accuracy": 10 * x + task})
            rows.append({"x": x, "direction": "M2[1:x]+M1[x+1:n]", "task": task, "accuracy": 100 + 10 * x + task})
    frame = swap_vs_k(pd.DataFrame(rows))
    assert list(frame.index) == [0, 1, 2, 3]
    assert (frame["E1 + T1 / task 1"] == 31).all() and (frame["E2 + T2 / task 2"] == 2).all()  # x = n and x = 0
    assert list(frame["E1 + T2 / task 1"]) == [1, 11, 21, 31]  # M1's first k layers under M2's tunnel
    assert list(frame["E2 + T1 / task 2"]) == [102, 112, 122, 132]
    assert list(frame["E1 + T2 - E1 + T1 (task 1)"]) == [-30, -20, -10, 0]


def test_one_cka_minibatch_rule_no_tiny_batch_equal_weight_and_streamed_equals_direct():
    """Issue 24, CKA batches: 515 rows at 500 were a batch of 500 and one of 15 (about 9x the spread) and
    502-503 rows divided by zero; now each batch holds at least the batch size (or all rows), sizes differ by
    at most one, and the streamed accumulators give the numbers of the direct computation."""
    from cltunnel.measures.similarity import CKA_MIN_ROWS, CKAMatrix, PairedCKA, cka_batches, cka_matrix, minibatch_cka

    assert cka_batches(5000, 500) == [slice(i, i + 500) for i in range(0, 5000, 500)]  # unchanged where it divides
    assert cka_batches(515, 500) == [slice(0, 515)]
    for n in (502, 503, 1015, 1999, 777):
        sizes = [s.stop - s.start for s in cka_batches(n, 500)]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and min(sizes) >= min(n, 500)
    with pytest.raises(ValueError, match=f"at least {CKA_MIN_ROWS} rows"):
        cka_batches(3, 500)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1015, 20, generator=g), torch.randn(1015, 30, generator=g)
    parts = cka_batches(1015, 500)
    paired = PairedCKA()
    matrix = CKAMatrix()
    for part in parts:
        paired.add("ab", a[part], b[part])
        matrix.add([a[part], b[part]])
    direct = minibatch_cka([(a[p], b[p]) for p in parts])
    assert paired.values()["ab"] == pytest.approx(direct, rel=1e-12)
    grams = [[(lambda f: f @ f.T)(t[p].double()) for t in (a, b)] for p in parts]
    assert torch.allclose(matrix.matrix(), cka_matrix(grams))
    assert matrix.matrix()[0, 1].item() == pytest.approx(direct, rel=1e-12)


def test_weight_change_is_over_parameters_not_batchnorm_statistics(pair):
    """Issue 24, weight change: the development analysis compares a layer's parameters only; BatchNorm's
    running means and variances are buffers, whose drift used to enter (and could dominate) the number."""
    from cltunnel.experiments.analyses import layer_parameters

    layer = next(layer for layer in pair[0].body if any(isinstance(m, torch.nn.BatchNorm2d) for m in layer.modules()))
    before = layer_parameters(layer).clone()
    for m in layer.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.add_(100.0)
            m.running_var.mul_(50.0)
    assert torch.equal(layer_parameters(layer), before)
    assert len(before) == sum(p.numel() for p in layer.parameters())


def test_the_shallow_figure_marks_the_full_depth_networks_own_k(tmp_path):
    """Issue 24, shallow figure: every depth runs the swap, and 'conv10' sorts before 'conv16', so the first
    swap_meta.txt found was the 10-layer network's k; now the full-depth runs' own k (or their resolved
    analyses.tunnel_start, which covers a base given as a file) marks the extractor."""
    import yaml

    from cltunnel.experiments.shallow import extractor_length

    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"configs": ["conv10", "conv16"], "source": {"base": "x.yaml"}}))
    for config, layers, k in (("conv10", 10, 3), ("conv16", None, 8)):
        run = tmp_path / config / "seed0"
        run.mkdir(parents=True)
        args = {"conv_layers": layers} if layers else {}
        (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "vgg19", "args": args},
                                                         "analyses": {"tunnel_start": "auto"}}))
        (run / "metrics.json").write_text("{}")
        (run / "swap_meta.txt").write_text(f"tunnel_start {k} of {layers or 16} layers (rule 'last' at 0.95)\n")
    assert extractor_length(tmp_path) == 8
    (tmp_path / "conv16" / "seed0" / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"name": "vgg19", "args": {}}, "analyses": {"tunnel_start": 9}}))
    assert extractor_length(tmp_path) == 9
