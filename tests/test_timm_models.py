"""timm models by name ("timm:<name>"): the per-family layer rule, the chain equal to timm's own forward, surgery
identities on a timm ResNet and ViT, one-line config errors, and a tunnel profile of a tiny timm run."""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from cltunnel.config import ConfigError, parse_config  # noqa: E402
from cltunnel.models.inner import inner_representations  # noqa: E402
from cltunnel.models.surgery import compose  # noqa: E402
from cltunnel.models.timm_models import split_timm  # noqa: E402
from cltunnel.models.zoo import build_model, check_model  # noqa: E402

VIT = ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4})
X = torch.randn(4, 3, 32, 32)

# name, timm args (zero-init residual branches and tiny layer scales switched off so no block is an identity),
# body layers by the family's rule
FAMILIES = [
    ("resnet18", {"zero_init_last": False}, 10),  # stem, 8 basic blocks, pool
    ("resnet18", {"zero_init_last": False, "cifar_stem": True}, 10),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, 14),  # embed, 12 blocks, pool
    ("convnext_atto", {"ls_init_value": 0.5}, 14),  # stem, 2+2+6+2 blocks, pool
    ("mobilenetv3_small_050", {"drop_rate": 0.2}, 15),  # stem, 11 blocks, pool, head_conv
    ("mobilenetv2_050", {"drop_rate": 0.2}, 20),  # stem, 17 blocks, head_conv, pool
]


def settled(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics (a few train-mode passes on noise), then eval mode."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32) * (1 + seed))
    return model.eval()


@pytest.mark.parametrize("name,args,n_layers", FAMILIES, ids=[f"{n}{'-cifar' if 'cifar_stem' in a else ''}"
                                                              for n, a, _ in FAMILIES])
def test_the_chained_body_is_timms_own_forward_and_holds_every_parameter_once(name, args, n_layers):
    from cltunnel.models.timm_models import create

    torch.manual_seed(0)
    args = dict(args)
    cifar = args.pop("cifar_stem", False)
    net = create(name, (3, 32, 32), **args, cifar_stem=cifar) if cifar else timm.create_model(name, **args)
    net.reset_classifier(7)  # a classifier to swap out (create() builds without one)
    net = settled(net, 1)
    with torch.no_grad():
        logits = net(X)
        classifier = copy.deepcopy(net.get_classifier())
        params = {id(p) for n, p in net.named_parameters()
                  if not n.startswith(("fc.", "head.fc.", "classifier.", "head.weight", "head.bias"))}
        layers, width = split_timm(net)
        body = nn.Sequential(layers).eval()
        pre_logits = net.forward_head(net.forward_features(X), pre_logits=True)
        chained = body(X)
    assert len(layers) == n_layers
    assert chained.shape == (4, width)
    assert torch.allclose(chained, pre_logits, atol=1e-5, rtol=1e-4)  # the chain is timm's forward ...
    assert torch.allclose(classifier(chained), logits, atol=1e-5, rtol=1e-4)  # ... before the head swap
    held = [id(p) for p in body.parameters()]
    assert len(held) == len(set(held)) and set(held) == params  # nothing left out, nothing twice
    if cifar:  # 3x3 stride-1 stem, no max-pool: the first layer keeps 32x32
        assert body[0](X).shape[-2:] == (32, 32)


def trained_like(name: str, args: dict, seed: int):
    torch.manual_seed(seed)
    return settled(build_model(name, [5, 5], (3, 32, 32), **args), seed)


@pytest.fixture(scope="module", params=[("timm:resnet18", {"zero_init_last": False}), VIT], ids=["resnet18", "vit"])
def pair(request):
    name, args = request.param
    return trained_like(name, args, 1), trained_like(name, args, 2)


def test_compose_identities_hold_on_timm_models(pair):
    m1, m2 = pair
    n = len(m1.body)
    X = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(m1(X, 0), m2(X, 0))
        assert torch.equal(compose(m1, m2, 0)(X, 0), m2(X, 0))  # M1[1:0] + M2[1:n] is M2
        assert torch.equal(compose(m1, m2, n, heads=m1.heads)(X, 1), m1(X, 1))  # M1[1:n] + M2[n+1:n] is M1
        for x in (0, 1, 2, n // 2, n - 1, n):
            assert torch.equal(compose(m1, m1, x)(X, 0), m1(X, 0))
        for x in (1, n // 2, n - 1):  # a composition is the layer-by-layer mix
            h = X
            for k in range(n):
                h = (m1 if k < x else m2).body[k](h)
            assert torch.equal(compose(m1, m2, x)(X, 1), m2.heads["1"](h))
    c = compose(m1, m2, 1)
    sources = {t.data_ptr() for m in pair for t in list(m.parameters()) + list(m.buffers())}
    assert not sources & {t.data_ptr() for t in list(c.parameters()) + list(c.buffers())}
    # the first layer's own parameters (a ViT's class token and position embedding) travel with it
    assert all(torch.equal(a, b) for a, b in zip(c.body[0].parameters(), m1.body[0].parameters()))


def test_vit_layers_are_token_sequences_that_probes_and_inner_hooks_read():
    from cltunnel.measures.similarity import numerical_rank

    m = trained_like(*VIT, seed=3)
    outs = m.layer_outputs(X)
    assert outs[1].shape == (4, 65, 192) and outs[13].shape == (4, 65, 192) and outs[14].shape == (4, 192)
    assert numerical_rank(outs[5].flatten(1), 1e-3) > 1
    reps = inner_representations(m, X[:2])
    assert {r.layer for r in reps} == set(range(1, 15))
    assert any(r.path == "blocks_0.attn.qkv" for r in reps)


def test_a_timm_model_rebuilds_from_its_spec_and_state():
    name, args = VIT[0], {**VIT[1], "depth": 2}
    a, b = trained_like(name, args, 4), trained_like(name, args, 5)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(a(X, 1), b(X, 1))


@pytest.mark.parametrize("name,args,match", [
    ("timm:resnt18", {}, r"not a timm model \(did you mean 'timm:resnet18'\?\)"),
    ("timm:resnet18", {"drop_rat": 0.1}, r"unexpected keyword argument 'drop_rat' \(did you mean 'drop_rate'\?\)"),
    ("timm:vit_tiny_patch16_224", {}, r"doesn't match model \(224\).*img_size"),
    ("timm:vit_tiny_patch16_224", {"img_size": 32, "cifar_stem": True}, "cifar_stem is a ResNet option"),
    ("timm:regnetx_002", {}, "RegNet has no layer rule here; families split: ResNet, VisionTransformer"),
    ("timn:resnet18", {}, r"did you mean 'timm:resnet18'\?"),
])
def test_bad_timm_names_and_args_cost_one_line_naming_the_closest(name, args, match):
    with pytest.raises(ConfigError, match=match) as err:
        check_model(name, 1.0, args, [5, 5], (3, 32, 32))
    assert "\n" not in str(err.value)


def test_check_counts_layers_on_meta_and_pretrained_is_off():
    assert check_model(*VIT[:1], 1.0, VIT[1], [5, 5], (3, 32, 32)) == 14
    assert check_model("timm:resnet18", 1.0, {"cifar_stem": True}, [5, 5], (3, 32, 32)) == 10
    from cltunnel.models.timm_models import create

    with torch.device("meta"):
        net = create("resnet18", (3, 32, 32))
    assert net.pretrained_cfg is not None and net.num_classes == 0


def test_a_tiny_timm_vit_run_gives_a_tunnel_profile(cifar10, tmp_path):
    """End to end: train a two-task run of a small timm ViT on CIFAR-10, then the tunnel profile (probes and
    ranks on every body layer, token sequences included)."""
    from cltunnel.runs import run_seed

    raw = {"name": "tiny_vit", "data": {"name": "cifar10", "train_per_class": 40, "test_per_class": 20},
           "scenario": {"tasks": [5, 5]},
           "model": {"name": "timm:vit_tiny_patch16_224",
                     "args": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}},
           "training": {"epochs": 1, "lr": 0.01, "batch_size": 50}, "device": "cpu", "output_dir": str(tmp_path),
           "analyses": {"run": ["tunnel"], "probe": {"epochs": 2}, "rank_samples": 100}}
    run_dir = run_seed(parse_config(raw), 0, cifar10, progress=False)
    profile = pd.read_csv(run_dir / "tunnel_profile.csv", index_col=0)
    assert list(profile.index) == [1, 2, 3, 4, 5]  # embed, 3 blocks, pool
    acc = next(c for c in profile.columns if "acc" in c)
    assert profile[acc].between(0, 100).all() and profile[acc].max() > 20  # above chance (5 classes)


def test_cltunnel_list_names_the_timm_families(capsys):
    from cltunnel.cli import main as cli_main

    assert cli_main(["list"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("timm models"))
    assert all(family in line for family in ("ResNet", "VisionTransformer", "ConvNeXt", "EfficientNet",
                                               "MobileNetV3"))


def test_inner_representations_of_a_timm_resnet_include_its_downsample_branch():
    m = trained_like("timm:resnet18", {"cifar_stem": True, "channels": [8, 16, 32, 64], "stem_width": 8}, 6)
    paths = [r.path for r in inner_representations(m, X[:2])]
    assert "layer1_0.conv1" in paths and "layer2_0.downsample.0" in paths and paths[-1].startswith("pool")
