"""`powergrad train` checks the data, the machine and the resume file of every recipe on its
command line before the first trains: each fault below exits 2 with one line naming the file
(or command line) that set the key, the key, the value and what was expected, and writes
nothing. The data are small files written here, so the expected counts are known."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from helpers_images import write_idx_gz

from powergrad.commands.train import main as train_main
from powergrad.config.loading import RecipeError, load_recipe
from powergrad.data.fashion_mnist import build_fashion_mnist_loaders
from powergrad.system.distributed import DistInfo
from powergrad.training import checkpoint as ckpt
from powergrad.training.preflight import preflight
from powergrad.training.preflight_data import inspect_data

TRAIN_IMAGES, TEST_IMAGES = 100, 20
SMALL_RESNET = {"model": "resnet18", "num_classes": 10, "in_chans": 1, "stem": "small",
                "kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8]}}


@pytest.fixture
def fashion_root(tmp_path):
    """Fashion-MNIST's four IDX files with 100 train and 20 test images."""
    root = tmp_path / "fashion"
    root.mkdir()
    for prefix, count in (("train", TRAIN_IMAGES), ("t10k", TEST_IMAGES)):
        write_idx_gz(root / f"{prefix}-images-idx3-ubyte.gz", np.zeros((count, 28, 28)))
        write_idx_gz(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return root


@pytest.fixture
def recipe_file(tmp_path, fashion_root):
    """A recipe that passes every check; the tests break one thing at a time."""
    def write(name="run.yaml", **sections):
        tree = {"model": dict(SMALL_RESNET),
                "data": {"dataset": "fashion_mnist", "root": str(fashion_root)},
                "train": {"batch_size": 10, "device": "cpu"},
                "log": {"output": str(tmp_path / "runs")}}
        for section, values in sections.items():
            tree.setdefault(section, {}).update(values)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(tree))
        return path
    return write


def refused(capsys, tmp_path, rc: int, where, key: str) -> str:
    """The message after 'recipe error: WHERE: KEY: ', checking the exit code, that it is
    one line, and that no run directory was written."""
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err
    prefix = f"recipe error: {where}: {key}: "
    assert err.startswith(prefix), err
    assert not (tmp_path / "runs").exists()
    return err[len(prefix):]


def test_a_good_recipe_passes_and_the_counts_are_the_files(recipe_file):
    recipe = load_recipe(recipe_file())
    preflight(recipe, world_size=1)
    facts = inspect_data(recipe)
    assert (facts.train_images, facts.num_classes, facts.channels) == (TRAIN_IMAGES, 10, 1)


def test_all_recipes_are_checked_before_the_first_trains(recipe_file, capsys, tmp_path):
    good = recipe_file("good.yaml")
    bad = recipe_file("bad.yaml", data={"root": str(tmp_path / "gone")})
    message = refused(capsys, tmp_path, train_main([str(good), str(bad)]), bad, "data.root")
    assert message.startswith(f"got '{tmp_path / 'gone'}': Fashion-MNIST not found at "
                              f"{tmp_path / 'gone' / 'train-images-idx3-ubyte.gz'}.")


def test_a_cut_short_data_file_is_named(recipe_file, fashion_root, capsys, tmp_path):
    images = fashion_root / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-6])  # a copy that stopped early
    message = refused(capsys, tmp_path, train_main([str(recipe_file())]), recipe_file(),
                      "data.root")
    assert f"{images}: header says (100, 28, 28) = 78416 bytes" in message
    assert message.endswith("the file is cut short or damaged")


def test_num_classes_against_the_data(recipe_file, capsys, tmp_path):
    path = recipe_file(model={"num_classes": 5})
    assert refused(capsys, tmp_path, train_main([str(path)]), path, "model.num_classes") == (
        f"got 5, but Fashion-MNIST at {tmp_path / 'fashion'} has 10 classes; expected 10")


def test_a_recipe_of_defaults_is_refused_for_its_channels(tmp_path, fashion_root, capsys):
    # timm's in_chans default (3) against 1-channel Fashion-MNIST: was a traceback in forward
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": str(fashion_root)},
                                    "log": {"output": str(tmp_path / "runs")}}))
    assert refused(capsys, tmp_path, train_main([str(path)]), path, "model.in_chans") == (
        f"got 3, but Fashion-MNIST at {fashion_root} has 1-channel images; expected 1")


def test_an_empty_recipe_file_is_refused(tmp_path, recipe_file, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here yet\n")
    rc = train_main([str(recipe_file()), str(empty)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == (f"recipe error: {empty}: the file is empty; expected sections "
                               "such as model, data, train (or `extends: base.yaml`)")
    assert not (tmp_path / "runs").exists()


def test_cuda_without_a_gpu(recipe_file, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = recipe_file(train={"device": "cuda"})
    assert refused(capsys, tmp_path, train_main([str(path)]), path, "train.device") == (
        "got 'cuda', but torch sees no CUDA device; expected cpu or auto on this machine")


@pytest.mark.parametrize("accum, fits", [(10, True), (11, False)])
def test_accumulation_must_leave_one_optimizer_step(recipe_file, capsys, tmp_path, accum, fits):
    # 100 images // 10 per micro-batch = 10 micro-batches: 10 accumulate to one step, 11 to none
    recipe = load_recipe(recipe_file(), [f"train.grad_accum_steps={accum}"])
    if fits:
        preflight(recipe, world_size=1)
        return
    rc = train_main([str(recipe_file()), f"train.grad_accum_steps={accum}"])
    assert refused(capsys, tmp_path, rc, f"command line (train.grad_accum_steps={accum})",
                   "train.grad_accum_steps") == (
        f"got 11: 100 training images (Fashion-MNIST at {tmp_path / 'fashion'}) // (10 images "
        "x 1 process(es)) // 11 accumulation step(s) = 0 optimizer steps per epoch; expected "
        "at least 1")


def test_a_batch_larger_than_the_data(recipe_file, capsys, tmp_path):
    path = recipe_file(train={"batch_size": 101})
    assert refused(capsys, tmp_path, train_main([str(path)]), path, "train.batch_size"
                   ).startswith("got 101: 100 training images")


def test_a_subset_smaller_than_a_batch(recipe_file, capsys, tmp_path):
    path = recipe_file(data={"train_subset": 9})
    assert refused(capsys, tmp_path, train_main([str(path)]), path, "data.train_subset"
                   ).startswith("got 9: 9 training images")


def test_the_world_size_counts_in_the_step(recipe_file, capsys, tmp_path, monkeypatch):
    path = recipe_file(train={"batch_size": 30})
    preflight(load_recipe(path), world_size=3)  # 100 // 90 = 1 step
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun sets it
    assert "// (30 images x 4 process(es)) // 1 accumulation step(s) = 0" in refused(
        capsys, tmp_path, train_main([str(path)]), path, "train.batch_size")


def test_a_global_batch_larger_than_the_data(recipe_file, capsys, tmp_path):
    path = recipe_file(train={"global_batch": 200})
    assert refused(capsys, tmp_path, train_main([str(path)]), path, "train.global_batch"
                   ).startswith("got 200: 100 training images")


@pytest.mark.parametrize("images, batch, world, accum", [
    (100, 10, 1, 10), (100, 10, 1, 11), (100, 30, 3, 1), (100, 30, 4, 1), (100, 33, 3, 1),
    (100, 34, 3, 1), (99, 7, 2, 7), (99, 7, 2, 8), (64, 8, 3, 2), (64, 8, 3, 3)])
def test_one_step_check_agrees_with_the_loader(recipe_file, images, batch, world, accum):
    # The loader of the rank with the fewest samples must fill `accum` micro-batches.
    recipe = load_recipe(recipe_file(), [f"data.train_subset={images}",
                                         f"train.batch_size={batch}",
                                         f"train.grad_accum_steps={accum}"])
    train_loader, _ = build_fashion_mnist_loaders(
        recipe.data, batch_size=batch, eval_batch_size=10, seed=0, device="cpu",
        dist_info=DistInfo(rank=world - 1, local_rank=world - 1, world_size=world))
    loader_has_a_step = len(train_loader) // accum >= 1
    try:
        preflight(recipe, world_size=world)
        passed = True
    except RecipeError:
        passed = False
    assert passed == loader_has_a_step


def test_resume_file_missing(recipe_file, capsys, tmp_path):
    gone = tmp_path / "gone.pth"
    path = recipe_file(log={"resume": str(gone)})
    assert refused(capsys, tmp_path, train_main([str(path)]), path, "log.resume") == (
        f"got '{gone}': {gone}: no such checkpoint; expected a training checkpoint (last.pth "
        "or step-*.pth), auto or none")


def test_resume_file_not_loadable(recipe_file, capsys, tmp_path):
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"PK\x03\x04 not really a checkpoint")
    path = recipe_file(log={"resume": str(damaged)})
    message = refused(capsys, tmp_path, train_main([str(path)]), path, "log.resume")
    assert message.startswith(f"got '{damaged}': {damaged}: cannot be read (")


def test_resume_file_with_weights_only(recipe_file, capsys, tmp_path):
    best = tmp_path / "best.pth"
    torch.save({"format": ckpt.WEIGHTS_FORMAT, "model": {}}, best)
    path = recipe_file(log={"resume": str(best)})
    assert f"{best}: holds weights only" in refused(
        capsys, tmp_path, train_main([str(path)]), path, "log.resume")


def test_a_model_timm_cannot_build(recipe_file, capsys, tmp_path):
    path = recipe_file(model={"kwargs": {"no_such_option": 1}})
    assert refused(capsys, tmp_path, train_main([str(path)]), path, "model.kwargs").startswith(
        "timm cannot build 'resnet18' with these settings: TypeError: ")


# --- ImageNet-style data: class folders and .beton files ---------------------------------

def image_tree(root, classes, per_class):
    """Class folders of empty .jpg files: the checks count files, they decode none."""
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.jpg").write_bytes(b"")
    return root


def image_recipe(recipe_file, tmp_path, **data):
    return recipe_file(model={"num_classes": 3, "in_chans": 3},
                       data={"dataset": "imagefolder", "loader": "torchvision",
                             "train_dir": str(tmp_path / "train"),
                             "val_dir": str(tmp_path / "val"), **data},
                       train={"batch_size": 4, "eval_batch_size": 10})


def test_image_folders_count_classes_and_images(recipe_file, tmp_path):
    image_tree(tmp_path / "train", ["ant", "bee", "cat"], 3)
    image_tree(tmp_path / "val", ["ant", "bee", "cat"], 1)
    (tmp_path / "train" / "ant" / ".DS_Store").write_bytes(b"")
    recipe = load_recipe(image_recipe(recipe_file, tmp_path))
    preflight(recipe, world_size=1)  # 9 images, 4 per step
    facts = inspect_data(recipe)
    assert (facts.train_images, facts.num_classes, facts.channels) == (9, 3, 3)


def test_image_folder_classes_against_the_model(recipe_file, capsys, tmp_path):
    image_tree(tmp_path / "train", ["ant", "bee", "cat", "dog"], 2)
    image_tree(tmp_path / "val", ["ant", "bee", "cat", "dog"], 1)
    path = image_recipe(recipe_file, tmp_path)
    assert refused(capsys, tmp_path, train_main([str(path)]), path, "model.num_classes") == (
        f"got 3, but ImageFolder {tmp_path / 'train'} has 4 classes; expected 4")


def test_image_folder_missing(recipe_file, capsys, tmp_path):
    image_tree(tmp_path / "val", ["ant", "bee", "cat"], 1)
    path = image_recipe(recipe_file, tmp_path)
    assert refused(capsys, tmp_path, train_main([str(path)]), path, "data.train_dir") == (
        f"got '{tmp_path / 'train'}': no such directory; expected an ImageFolder tree "
        f"({tmp_path / 'train'}/<class>/<image>)")


def test_validation_classes_differ(recipe_file, capsys, tmp_path):
    image_tree(tmp_path / "train", ["ant", "bee", "cat"], 2)
    image_tree(tmp_path / "val", ["ant", "bee"], 1)
    path = image_recipe(recipe_file, tmp_path)
    assert refused(capsys, tmp_path, train_main([str(path)]), path, "data.val_dir") == (
        f"got '{tmp_path / 'val'}' with 2 classes; expected the same classes as the training "
        "data's 3 (differing: ['cat'])")


def test_a_damaged_beton_is_named(recipe_file, capsys, tmp_path):
    for split in ("train", "val"):
        (tmp_path / f"{split}.beton").write_bytes(b"\x00" * 64)
    path = image_recipe(recipe_file, tmp_path, loader="ffcv",
                        train_beton=str(tmp_path / "train.beton"),
                        val_beton=str(tmp_path / "val.beton"))
    assert refused(capsys, tmp_path, train_main([str(path)]), path, "data.train_beton"
                   ).startswith(f"{tmp_path / 'train.beton'}: .beton is truncated or corrupt")


def test_ffcv_loader_without_beton_files(recipe_file, capsys, tmp_path):
    path = image_recipe(recipe_file, tmp_path, loader="ffcv")
    assert refused(capsys, tmp_path, train_main([str(path)]), path, "data.loader") == (
        "got 'ffcv': data.loader is 'ffcv' but data.train_beton and data.val_beton are not "
        "both set (write them with tools/write_ffcv.py)")


def test_two_recipes_of_one_name_would_share_a_run_directory(recipe_file, capsys, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = recipe_file("a/run.yaml"), recipe_file("b/run.yaml")
    assert refused(capsys, tmp_path, train_main([str(first), str(second)]), second,
                   "log.experiment") == (
        f"not set, so the file name is used: {second} and {first} would both write "
        f"{tmp_path / 'runs' / 'run'}; expected one run directory per recipe (set "
        "log.experiment=NAME)")
    preflight(load_recipe(second), world_size=1)  # each alone is fine


def test_a_run_directory_of_other_settings_is_found_before_any_training(recipe_file, capsys,
                                                                          tmp_path):
    from powergrad.config.loading import dump_recipe

    first, second = recipe_file("first.yaml"), recipe_file("second.yaml")
    earlier = tmp_path / "runs" / "second"
    earlier.mkdir(parents=True)
    dump_recipe(load_recipe(second, ["optim.lr=0.3"]), earlier / "recipe.yaml")
    rc = train_main([str(first), str(second)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith(f"recipe error: {second}: log.experiment: not set, so the file name "
                          f"is used: {earlier} holds a run of other settings")
    assert "optim.lr: 0.3 -> 0.1" in err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["second"]  # first: not run


def test_the_memory_check_counts_the_ema_and_the_evaluation_batch(monkeypatch):
    """Activation sizes made up by hand (1 MB kept per training image, a widest layer
    output of 100 bytes per image), so the need is known: 16 bytes per parameter (weights,
    gradients, two optimizer states), 4 more with an EMA, then the larger of one micro-batch's
    training activations and one evaluation batch's two widest outputs."""
    from powergrad.training import preflight as checks

    monkeypatch.setattr(checks, "_activation_bytes", lambda model, images: (2 * 10**6, 200))
    base = ["model.kwargs.channels=[8, 8, 16, 16]", "train.batch_size=16",
            "train.eval_batch_size=50", "data.train_subset=64", "data.eval_subset=64"]
    recipe = load_recipe("recipes/fashion_mnist/resnet_pgt.yaml", base)
    params = sum(p.numel() for p in checks.check_model_builds(recipe).parameters())
    train_need = 10**6 * 16  # > 2 * 100 * 50 for evaluation
    have = 16 * params + train_need + 2 * params  # room for half an EMA
    monkeypatch.setattr(checks, "_device_memory", lambda recipe: (have, "the test's GPU"))
    preflight(recipe, 1)  # fits without an EMA
    with pytest.raises(RecipeError, match="train.batch_size: got 16 .* weights, EMA, optimizer"):
        preflight(load_recipe("recipes/fashion_mnist/resnet_pgt.yaml",
                              [*base, "train.model_ema=true"]), 1)
    too_many = have // (2 * 100) + 1  # their widest outputs alone pass the memory
    with pytest.raises(RecipeError, match=f"train.eval_batch_size: got {too_many}: .* "
                                          f"evaluation of {too_many} images"):
        preflight(load_recipe("recipes/fashion_mnist/resnet_pgt.yaml",
                              [*base, f"train.eval_batch_size={too_many}"]), 1)


def test_more_processes_than_gpus_is_refused_by_the_one_device_rule(tmp_path, recipe_file,
                                                                     monkeypatch):
    """Preflight refuses a launch with fewer visible GPUs than processes on the node with the
    words of distributed.process_device, the rule set-up applies (not a second message)."""
    from powergrad.system import gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(gpus, "refuse_unusable_gpu", lambda: None)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    path = recipe_file(train={"device": "cuda"})
    with pytest.raises(RecipeError, match=r"train\.device: got 'cuda': local rank 2 of 3 "
                                          r"process\(es\) on this node, but only 2 GPU\(s\) "
                                          r"are visible"):
        preflight(load_recipe(path), 3)
