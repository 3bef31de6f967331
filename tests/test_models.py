from __future__ import annotations

import pytest
import torch
from torch import nn

from cltunnel.models.layered import LayeredModel, wrap_model
from cltunnel.models.zoo import build_model


@pytest.mark.parametrize("name,depth,convs", [("vgg11", 11, 8), ("vgg13", 13, 10), ("vgg16", 16, 13),
                                              ("vgg19", 19, 16)])
def test_vgg_layer_counts_follow_the_thesis(name, depth, convs):
    m = build_model(name, [5, 5], (3, 32, 32), width=0.125)
    assert m.depth == depth and len(m.body) == depth - 1
    assert sum(isinstance(x, nn.Conv2d) for x in m.body.modules()) == convs
    assert m.layer_names[-2:] == ["fc1", "fc2"]
    assert m(torch.randn(2, 3, 32, 32), 1).shape == (2, 5)


@pytest.mark.parametrize("k", [4, 8, 12])
def test_shallow_vgg19_keeps_the_first_k_conv_layers(k):
    m = build_model("vgg19", [5, 5], (3, 32, 32), width=0.125, conv_layers=k)
    assert sum(isinstance(x, nn.Conv2d) for x in m.body.modules()) == k and len(m.body) == k + 2
    assert sum(isinstance(x, nn.MaxPool2d) for x in m.body.modules()) == 5
    assert m(torch.randn(2, 3, 32, 32), 0).shape == (2, 5)


def test_resnet_and_mlp_layer_counts():
    r18 = build_model("resnet18", [10], (3, 32, 32), width=0.125)
    assert r18.layer_names[0] == "stem" and r18.layer_names[-1] == "pool" and len(r18.body) == 10
    assert len(build_model("resnet34", [10], (3, 32, 32), width=0.125).body) == 18
    noskip = build_model("resnet18_noskip", [10], (3, 32, 32), width=0.125)
    assert not any(b.skip for b in noskip.body if hasattr(b, "skip"))
    mlp = build_model("mlp", [2] * 5, (1, 28, 28), depth=12)
    assert mlp.depth == 12 and mlp.body[0][1].out_features == 1024


def test_layer_outputs_are_the_sequential_forward():
    m = build_model("vgg11", [5, 5], (3, 32, 32), width=0.125).eval()
    x = torch.randn(3, 3, 32, 32)
    outs = m.layer_outputs(x)
    h = x
    for k, layer in enumerate(m.body, start=1):
        h = layer(h)
        assert torch.equal(outs[k], h)
    assert torch.equal(m.features(x, upto=4), outs[4])
    assert torch.equal(m(x, 1), m.heads["1"](outs[len(m.body)]))


def test_mixed_task_batch_routes_each_row_to_its_head():
    torch.manual_seed(0)
    m = build_model("mlp", [3, 7], (1, 28, 28), depth=3).eval()
    x = torch.randn(4, 1, 28, 28)
    out = m(x, torch.tensor([0, 1, 0, 1]))
    # A batch of 4 and a batch of 1 take different matmul kernels: equal up to float rounding, not bitwise.
    assert torch.allclose(out[0, :3], m(x[:1], 0)[0], atol=1e-6)
    assert torch.allclose(out[1], m(x[1:2], 1)[0], atol=1e-6)
    assert torch.all(out[0, 3:] == 0), "rows of a narrower head are padded with zeros"


def test_wrap_a_timm_resnet_with_cifar_stem():
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet18", num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    names = ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4", "global_pool"]
    x = torch.randn(2, 3, 32, 32)
    wrapped = wrap_model(net, names, "fc", [10], example=x)
    assert isinstance(wrapped, LayeredModel) and wrapped.layer_names[4] == "layer1"
    net.eval()
    wrapped.heads["0"].load_state_dict(net.fc.state_dict())
    wrapped.eval()
    assert torch.allclose(wrapped(x, 0), net(x), atol=1e-5)


def test_wrap_refuses_a_model_whose_forward_is_not_the_chain():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.a(x) + x)

    with pytest.raises(ValueError, match="does not reproduce"):
        wrap_model(Skip(), ["a"], "fc", [2], example=torch.randn(3, 4))
    with pytest.raises(ValueError, match="'b' is not a submodule"):
        wrap_model(Skip(), ["b"], "fc", [2])


@pytest.mark.parametrize("depth", [11, 13, 16, 19])
def test_shallow_vgg_variants_have_the_layer_counts_they_claim(depth):
    from cltunnel.models.zoo import VGG_STAGES

    for k in range(1, sum(VGG_STAGES[depth]) + 1):
        m = build_model(f"vgg{depth}", [5, 5], (3, 32, 32), 0.125, conv_layers=k)
        convs = [mod for mod in m.body.modules() if isinstance(mod, nn.Conv2d)]
        pools = [mod for mod in m.body.modules() if isinstance(mod, nn.MaxPool2d)]
        assert len(convs) == k and len(m.body) == k + 2 and len(pools) == 5, (depth, k)
        assert m(torch.zeros(2, 3, 32, 32), 0).shape == (2, 5)


@pytest.mark.parametrize("depth", [8, 14, 20, 38, 56])
def test_the_cifar_resnet_family_has_n_blocks_per_stage_and_depth_20_is_resnet20(depth):
    """Issue 25, item 1: He et al.'s CIFAR ResNet at depth 6n + 2: a stem, 3n blocks (body layers), a pool;
    depth 20 is the registered ResNet-20, weight for weight; a depth that is not 6n + 2 is a one-line error."""
    from cltunnel.config import ConfigError
    from cltunnel.models.zoo import build_model, check_model

    n = (depth - 2) // 6
    assert check_model("cifar_resnet", 2.0, {"depth": depth}, [5, 5], (3, 32, 32)) == 3 * n + 2
    if depth == 20:
        torch.manual_seed(0)
        family = build_model("cifar_resnet", [10], (3, 32, 32), 1.0, depth=20)
        torch.manual_seed(0)
        resnet20 = build_model("resnet20", [10], (3, 32, 32), 1.0)
        x = torch.randn(4, 3, 32, 32)
        assert torch.equal(family.eval()(x, 0), resnet20.eval()(x, 0))
    with pytest.raises(ConfigError, match="6n \\+ 2"):
        check_model("cifar_resnet", 1.0, {"depth": 21}, [10], (3, 32, 32))
