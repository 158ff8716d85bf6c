"""Evaluation under DDP counts each image once, with every image loader (torchvision, ffcv,
DALI): 2 gloo processes score 51 validation images (shards of 26 and 25: no even split can
hide a repeat) and must give what one process gives: the same loss, top-1, top-5 and image
count. The one-process numbers come from the same evaluate() without a process group; their
count is checked against the 51 files written."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers_images import textured_folder
from helpers_net import free_port

pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.cluster]

LOADERS = ("torchvision", "ffcv", "dali")
IMAGES_PER_CLASS = 17  # 3 classes: 51 images
EVAL_BATCH = 8  # 26 = 3 x 8 + 2 and 25 = 3 x 8 + 1: each rank ends on a partial batch
# More outputs than the 3 classes, so that top-5 is not 100 % whatever the model does.
OUTPUTS = 8


def eval_loader(root: str, loader: str, dist_info):
    from powergrad.config.schema import DataConfig
    from powergrad.data import build_loaders

    cfg = DataConfig(dataset="imagefolder", loader=loader, train_dir=f"{root}/val",
                     val_dir=f"{root}/val", train_beton=f"{root}/val.beton",
                     val_beton=f"{root}/val.beton", img_size=32, val_img_size=32, workers=1)
    return build_loaders(cfg, batch_size=4, eval_batch_size=EVAL_BATCH, seed=0, device="cpu",
                         dist_info=dist_info)[1]


def small_model() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=OUTPUTS)


def prepare(root: str) -> None:
    """The .beton of the 51 images, and fixed weights whose predictions vary by image: an
    untrained network's BatchNorm statistics (mean 0, variance 1) leave every image with the
    same top class, so the statistics are first taken from these images."""
    from powergrad.data.ffcv_writer import ImageWriterSettings, write_imagefolder_beton
    from powergrad.system.distributed import DistInfo

    write_imagefolder_beton(f"{root}/val", f"{root}/val.beton", settings=ImageWriterSettings(),
                            workers=1)
    model = small_model()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # the plain average over the batches
    with torch.no_grad():
        for images, _ in eval_loader(root, "torchvision", DistInfo()):
            model(images)
    torch.save(model.state_dict(), f"{root}/model.pt")


def scores(root: str, loader: str, dist_info) -> dict:
    from powergrad.training.evaluate import evaluate

    model = small_model()
    model.load_state_dict(torch.load(f"{root}/model.pt", weights_only=True))
    return evaluate(model, eval_loader(root, loader, dist_info), torch.device("cpu"), None)


def warm_up() -> None:
    """The imports prepare() makes (ffcv's alone takes seconds), on the other rank meanwhile."""
    import ffcv.loader  # noqa: F401
    import nvidia.dali.plugin.pytorch  # noqa: F401

    import powergrad.data.torchvision_loaders  # noqa: F401
    small_model()


def rank_main(rank: int, world: int, port: int, root: str) -> None:
    import multiprocessing

    import torch.distributed as dist

    from powergrad.system.distributed import DistInfo

    # Forked loader and writer workers, as under torchrun: mp.spawn leaves its processes'
    # default at spawn, and a spawned worker imports everything again (seconds each).
    multiprocessing.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    prepare(root) if rank == 0 else warm_up()
    dist.barrier()
    info = DistInfo(rank=rank, local_rank=rank, world_size=world, local_world_size=world)
    results = {"two": {name: scores(root, name, info) for name in LOADERS}}
    dist.destroy_process_group()
    if rank == 0:  # the reference: one process, no process group, every image
        results["one"] = {name: scores(root, name, DistInfo()) for name in LOADERS}
        Path(root, "scores.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("eval_once")
    written = textured_folder(root / "val", per_class=IMAGES_PER_CLASS)
    saved = {k: os.environ.get(k) for k in ("GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS")}
    os.environ.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    try:
        mp.spawn(rank_main, args=(2, free_port(), str(root)), nprocs=2, join=True)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    return len(written), json.loads((root / "scores.json").read_text())


@pytest.mark.parametrize("loader", LOADERS)
def test_two_processes_score_every_image_once(loader, results):
    files, scored = results
    one, two = scored["one"][loader], scored["two"][loader]
    assert files == 3 * IMAGES_PER_CLASS == one["images"]  # the reference counts each once
    assert 0 < one["top1"] < one["top5"] < 100  # the weights tell the images apart
    assert two["images"] == one["images"], (two, one)
    assert two["top1"] == pytest.approx(one["top1"], abs=1e-9), (two, one)
    assert two["top5"] == pytest.approx(one["top5"], abs=1e-9), (two, one)
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-6), (two, one)
