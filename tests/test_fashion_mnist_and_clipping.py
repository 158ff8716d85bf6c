"""Fashion-MNIST from Debian's files, AGC's classifier exclusion and its statistics, and
checkpoints that survive a crash mid-write."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from powergrad.config.schema import DataConfig
from powergrad.data.fashion_mnist import (DEBIAN_ROOT, MEAN, STD, DatasetMissingError,
                                          FashionMNISTLoader, load_split)
from powergrad.training import checkpoint as ckpt
from powergrad.training.clipping import agc_clipped_fraction, clip_gradients, clip_parameters


@pytest.fixture(scope="module")
def test_split():
    return load_split(DEBIAN_ROOT, "test")


def test_debian_files_parse_to_the_published_sizes(test_split):
    images, labels = test_split
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    # Fashion-MNIST's test split has exactly 1,000 images of each of its 10 classes
    assert torch.bincount(labels).tolist() == [1000] * 10
    # the first image, read independently from the raw bytes
    with gzip.open(Path(DEBIAN_ROOT) / "t10k-images-idx3-ubyte.gz", "rb") as f:
        magic, count, rows, cols = struct.unpack(">IIII", f.read(16))
        first = np.frombuffer(f.read(rows * cols), dtype=np.uint8).reshape(rows, cols)
    assert (magic, count) == (2051, 10000)
    assert np.array_equal(images[0].numpy(), first)


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        load_split(tmp_path, "train")


def test_corrupt_idx_file_is_named(tmp_path):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"\x00\x00\x08\x03" + struct.pack(">III", 5, 28, 28) + b"\x00" * 100)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: header says"):
        load_split(tmp_path, "train")


def test_eval_batches_are_normalised_in_order(test_split):
    images, labels = test_split
    loader = FashionMNISTLoader(images[:300], labels[:300], batch_size=128, train=False)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [128, 128, 44] and len(loader) == 3
    x = torch.cat([b[0] for b in batches])
    expected = (images[:300].double() / 255 - MEAN) / STD
    assert torch.allclose(x[:, 0].double(), expected, atol=1e-6)
    assert torch.equal(torch.cat([b[1] for b in batches]), labels[:300])


def test_train_augmentation_is_a_shift_or_mirror_of_the_original(test_split):
    images, labels = test_split
    loader = FashionMNISTLoader(images[:64], labels[:64], batch_size=64, train=True, seed=3,
                                pad=2, hflip=0.5)
    loader.set_epoch(0)
    order = loader._indices()
    (x, y), = list(loader)
    assert torch.equal(y, labels[:64][order])
    background = (0 - MEAN) / STD
    originals = (images[:64][order].double() / 255 - MEAN) / STD
    for img, orig in zip(x[:, 0].double(), originals):
        padded = torch.nn.functional.pad(orig, [2, 2, 2, 2], value=background)
        candidates = [c for dy in range(5) for dx in range(5)
                      for c in (padded[dy:dy + 28, dx:dx + 28], padded[dy:dy + 28, dx:dx + 28].flip(-1))]
        assert min((img - c).abs().max().item() for c in candidates) < 1e-6


def test_train_order_is_reproducible_per_epoch_and_sharded_across_ranks(test_split):
    images, labels = test_split
    make = lambda rank: FashionMNISTLoader(images[:100], labels[:100], batch_size=10, train=True,
                                           seed=1, rank=rank, world_size=2)
    a, b = make(0), make(1)
    a.set_epoch(4), b.set_epoch(4)
    ia, ib = a._indices(), b._indices()
    assert sorted(torch.cat([ia, ib]).tolist()) == list(range(100))  # disjoint and complete
    again = make(0)
    again.set_epoch(4)
    assert torch.equal(again._indices(), ia)
    again.set_epoch(5)
    assert not torch.equal(again._indices(), ia)


def small_resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", layers=[1, 1, 1, 1], channels=[8, 16, 32, 64],
                             num_classes=10, in_chans=1)


def test_agc_excludes_the_classifier():
    model = small_resnet()
    params = clip_parameters(model, "agc", exclude_head=True)
    head = {id(p) for p in model.get_classifier().parameters()}
    assert head and not head & {id(p) for p in params}
    assert len(params) == len(list(model.parameters())) - 2
    assert len(clip_parameters(model, "norm", exclude_head=True)) == len(list(model.parameters()))

    model(torch.randn(8, 1, 28, 28)).pow(2).sum().mul(100).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    clip_gradients(params, "agc", 1e-4)
    assert torch.equal(model.fc.weight.grad, before["fc.weight"])  # classifier untouched
    assert not torch.equal(model.conv1.weight.grad, before["conv1.weight"])  # clipped


def test_agc_statistics_against_an_independent_computation():
    model = small_resnet()
    model(torch.randn(8, 1, 28, 28)).pow(2).sum().backward()
    params = clip_parameters(model, "agc", exclude_head=True)
    factor, eps = 0.05, 1e-3
    clipped = total = 0
    for p in params:  # unit = output row (dim 0) for conv/linear, the whole tensor for 1-D
        w = p.detach().double().reshape(p.shape[0], -1) if p.dim() > 1 else p.detach().double().reshape(1, -1)
        g = p.grad.double().reshape(w.shape)
        limit = np.maximum(np.linalg.norm(w.numpy(), axis=1), eps) * factor
        hit = np.linalg.norm(g.numpy(), axis=1) > limit
        clipped += hit.sum() * w.shape[1]
        total += p.numel()
    assert agc_clipped_fraction(params, factor) == pytest.approx(clipped / total, rel=1e-9)
    stats = clip_gradients(params, "agc", factor, measure=True)
    clipped_norm = np.sqrt(sum((p.double() ** 2).sum().item() for p in
                              [q.grad for q in params]))
    assert stats["clip/grad_norm_after"] == pytest.approx(clipped_norm, rel=1e-5)
    assert stats["clip/grad_norm_before"] >= stats["clip/grad_norm_after"]


def test_a_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    ckpt.save_atomic({"step": torch.tensor(1)}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(ckpt.CheckpointError,
                       match=r"could not write the checkpoint \(disk full\); the previous one"):
        ckpt.save_atomic({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert ckpt.load(path)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary left behind


def test_rng_state_round_trips_through_weights_only(tmp_path):
    state = ckpt.rng_state()
    ckpt.save_atomic({"rng": state}, tmp_path / "r.pth")
    expected = (torch.rand(3), np.random.rand(3))
    ckpt.restore_rng_state(ckpt.load(tmp_path / "r.pth")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])


def test_data_config_default_is_debian_path():
    assert DataConfig().root == DEBIAN_ROOT
