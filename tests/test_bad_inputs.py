"""Every expected failure is one line naming the file, key or value, found before work where it
can be, and nothing is half-written: damaged data, places the user names, GPU recipes on a
CPU, and the tools."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers_images import CLASSES, textured_folder
from powergrad.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
RESNET18 = REPO / "recipes/imagenet/resnet18_cosine_baseline.yaml"


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.fixture
def damaged_folder(tmp_path):
    """An ImageNet-format tree whose train/bee holds one JPEG cut in half, in the middle of
    the class, where a check of each class's first and last files does not look."""
    items = textured_folder(tmp_path / "train", per_class=8)
    textured_folder(tmp_path / "val", per_class=2, seed=1)
    bad = Path(items[8 + 4][0])
    assert bad.parent.name == "bee"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return tmp_path, bad


def small_run(root: Path, out: Path, *extra: str) -> list[str]:
    return [str(RESNET18), f"data.train_dir={root / 'train'}", f"data.val_dir={root / 'val'}",
            "data.loader=torchvision", "data.workers=0", "data.img_size=32",
            "data.val_img_size=32", f"model.num_classes={len(CLASSES)}",
            f"data.num_classes={len(CLASSES)}", "train.global_batch=4", "train.batch_size=4",
            "train.amp_dtype=float32", "train.eval_batch_size=6", "train.epochs=1",
            "sched.cooldown_epochs=0", "sched.warmup_epochs=0", f"log.output={out}", *extra]


def test_check_data_names_the_truncated_jpeg_among_many(damaged_folder, capsys):
    root, bad = damaged_folder
    (root / "train" / "cat" / "README.txt").write_text("not an image")
    assert cli_main(["check-data", str(root / "train"), "--workers", "2"]) == 2
    out = capsys.readouterr().out
    bad_lines = [line for line in out.splitlines() if line.startswith("bad: ")]
    assert sorted(bad_lines) == sorted([
        f"bad: {bad}: JPEG is truncated (no end-of-image marker)",
        f"bad: {root / 'train' / 'cat' / 'README.txt'}: not an image file (extensions "
        "allowed: .jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp); move it out of "
        "the class folder"])
    assert "24 images in 3 classes checked" in out  # every image opened, the stray file not
    assert cli_main(["check-data", str(root / "val")]) == 0


def test_a_truncated_jpeg_mid_class_stops_training_with_one_line(damaged_folder, tmp_path,
                                                                 capsys):
    root, bad = damaged_folder
    assert cli_main(["train", *small_run(root, tmp_path / "runs")]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"data error: {bad}: unreadable image (RuntimeError: ")
    assert "powergrad check-data" in err and "data.bad_images=skip" in err
    assert not list((tmp_path / "runs").rglob("*.pth"))  # nothing of the epoch saved


def test_bad_images_skip_trains_past_it_and_counts_it(damaged_folder, tmp_path, capsys):
    root, bad = damaged_folder
    assert cli_main(["train", *small_run(root, tmp_path / "runs", "data.bad_images=skip")]) == 0
    out = capsys.readouterr().out
    assert "| 1 unreadable image(s) skipped" in out
    run = tmp_path / "runs" / RESNET18.stem
    final = json.loads((run / "final.json").read_text())
    assert final["bad_images_skipped"] == 1 and final["updates"] == 6
    from powergrad.compare import read_scalars
    assert [v for _, v in read_scalars(run)["data/bad_images"]] == [1.0]


def test_preflight_refuses_a_stray_file_and_an_empty_class_before_any_work(tmp_path, capsys):
    textured_folder(tmp_path / "train", per_class=4)
    textured_folder(tmp_path / "val", per_class=1, seed=1)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("x")
    (tmp_path / "val" / "dog").mkdir()
    args = ["train", *small_run(tmp_path, tmp_path / "runs")]
    assert cli_main(args) == 2
    err = one_line(capsys.readouterr().err)
    assert f"data.train_dir: got '{tmp_path / 'train'}': {tmp_path / 'train/ant/notes.txt'}: " \
           "not an image file" in err
    assert not (tmp_path / "runs").exists()
    (tmp_path / "train" / "ant" / "notes.txt").unlink()
    assert cli_main(args) == 2
    err = one_line(capsys.readouterr().err)
    assert f"data.val_dir: got '{tmp_path / 'val'}': {tmp_path / 'val/dog'}: class folder " \
           "is empty" in err
