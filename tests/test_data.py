from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cltunnel.data.images import DataNotFoundError, DeviceAugment, Normalise, from_torchvision, load_dataset


def test_cifar10_loads_exact_train_and_marks_lossless_test_rows(cifar10):
    assert cifar10.x_train.shape == (50000, 3, 32, 32) and cifar10.x_train.dtype == torch.uint8
    assert cifar10.x_test.shape == (10000, 3, 32, 32)
    assert torch.bincount(cifar10.y_train).tolist() == [5000] * 10
    assert cifar10.test_lossless.sum().item() == 1000 and cifar10.test_lossless[:1000].all()
    assert cifar10.has_lossy_test_rows
    assert cifar10.y_train[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # official data_batch_1 order
    mean, std = cifar10.channel_stats()
    assert torch.allclose(mean, torch.tensor([0.49139968, 0.48215841, 0.44653091]), atol=1e-6)
    assert torch.allclose(std, torch.tensor([0.24703223, 0.24348513, 0.26158784]), atol=1e-5)


def test_mnist_loads_with_channel_axis(mnist):
    assert mnist.x_train.shape == (60000, 1, 28, 28)
    assert not mnist.has_lossy_test_rows
    assert abs(mnist.channel_stats()[0].item() - 0.1307) < 1e-3


def test_mnist_rendered_as_cifar_input_keeps_every_pixel(mnist):
    from cltunnel.data.images import rendered_as

    rgb = rendered_as(mnist, (3, 32, 32))
    assert rgb.shape == (3, 32, 32) and rgb.x_test.dtype == torch.uint8 and torch.equal(rgb.y_test, mnist.y_test)
    for c in range(3):  # the digit, unchanged, in every channel, centred; a zero frame of 2 pixels
        assert torch.equal(rgb.x_train[:, c, 2:30, 2:30], mnist.x_train[:, 0])
    frame = rgb.x_test.clone()
    frame[:, :, 2:30, 2:30] = 0
    assert frame.sum() == 0
    with pytest.raises(ValueError, match="channels"):
        rendered_as(rgb, (1, 28, 28))


def test_missing_data_names_files_directory_and_remedy(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("cifar10", tmp_path, source="npz")
    msg = str(err.value)
    assert str(tmp_path) in msg and "cifar10-test.npz" in msg and "CLTUNNEL_DATA" in msg and "download" in msg


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="cifar100"):
        load_dataset("imagenet")


def _write_idx(path: Path, array: np.ndarray) -> None:
    dims = array.shape
    header = struct.pack(">HBB", 0, 0x08, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_source_reads_the_same_mnist(tmp_path, real_data_dir, mnist):
    """The online path (torchvision's MNIST class) fed with idx files written from the exact local copy."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    m = np.load(real_data_dir / "mnist.npz")
    _write_idx(raw / "train-images-idx3-ubyte", m["x_train"])
    _write_idx(raw / "train-labels-idx1-ubyte", m["y_train"])
    _write_idx(raw / "t10k-images-idx3-ubyte", m["x_test"])
    _write_idx(raw / "t10k-labels-idx1-ubyte", m["y_test"])
    tv = load_dataset("mnist", source="torchvision", cache_dir=tmp_path)
    assert tv.source.startswith("torchvision")
    assert torch.equal(tv.x_train, mnist.x_train) and torch.equal(tv.y_test, mnist.y_test)


def test_torchvision_source_fashion_mnist_slice(tmp_path, real_data_dir):
    """Fashion-MNIST through torchvision's class, from the 2,000-image slice that is here."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    f = np.load(real_data_dir / "fashion_mnist-test-first2000.npz")
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", f["x_test"])
        _write_idx(raw / f"{split}-labels-idx1-ubyte", f["y_test"])
    tv = load_dataset("fashion_mnist", source="torchvision", cache_dir=tmp_path)
    assert tv.x_test.shape == (2000, 1, 28, 28) and tv.classes[0] == "T-shirt/top"
    assert tv.y_test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


def test_torchvision_missing_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="download is off"):
        load_dataset("cifar100", source="torchvision", cache_dir=tmp_path)


def test_from_torchvision_converts_cifar_style_hwc_arrays():
    data = np.random.randint(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    ds = SimpleNamespace(data=data, targets=[0, 1, 2, 0, 1, 2], classes=["a", "b", "c"], root="x")
    img = from_torchvision("cifar100", ds, ds)
    assert img.x_train.shape == (6, 3, 32, 32)
    assert torch.equal(img.x_train[2].permute(1, 2, 0), torch.from_numpy(data[2]))


def test_svhn_style_objects_nchw_with_labels_and_no_classes_convert(tmp_path):
    """SVHN (the thesis's OOD set) comes from torchvision as NCHW arrays with .labels and no .classes."""
    data = np.random.randint(0, 255, (5, 3, 32, 32), dtype=np.uint8)
    ds = SimpleNamespace(data=data, labels=np.array([3, 1, 9, 0, 3]), root="x")
    img = from_torchvision("svhn", ds, ds)
    assert img.x_test.shape == (5, 3, 32, 32) and torch.equal(img.x_test, torch.from_numpy(data))
    assert img.y_train.tolist() == [3, 1, 9, 0, 3] and img.classes == [str(c) for c in range(10)]
    with pytest.raises(DataNotFoundError, match="svhn"):  # offline, torchvision's split= keyword is used
        load_dataset("svhn", source="torchvision", cache_dir=tmp_path)


def test_augment_crops_are_windows_of_the_padded_image_and_flips_mirror():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    out = DeviceAugment(pad=4, flip=True)(x, gen)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    shifted = 0
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        match = [torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows]
        assert any(match), f"sample {i} is not a (flipped) crop"
        shifted += not torch.equal(out[i], x[i])
    assert shifted > 48  # nearly all samples moved or flipped


def test_normalise_matches_reference_formula():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    expected = (x.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(Normalise(mean, std)(x), expected, atol=1e-5)
