"""tools/prepare_imagenet.py on a tiny archive set laid out like ILSVRC2012's: a train tar of
per-class tars, a flat validation tar, a devkit tar.gz and a LOC_val_solution.csv."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
from helpers_imagenet_archives import IDS, TINY, TRAIN, VAL, build, real_meta_mat, val_name
from torchvision.datasets import ImageFolder

from powergrad.data import imagenet_archives
from powergrad.data.imagenet_archives import Expected

TOOL = Path(__file__).resolve().parents[1] / "tools" / "prepare_imagenet.py"


def run_tool(archives: Path, out: Path, *extra: str, labels: str = "csv") -> int:
    spec = importlib.util.spec_from_file_location("prepare_imagenet", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    label_args = (["--val-solution", str(archives / "LOC_val_solution.csv")] if labels == "csv"
                  else ["--devkit", str(archives / "ILSVRC2012_devkit_t12.tar.gz")])
    return tool.main(["--train", str(archives / "ILSVRC2012_img_train.tar"),
               "--val", str(archives / "ILSVRC2012_img_val.tar"), *label_args, *extra, str(out)])


def run_failing(archives: Path, out: Path, *extra: str, **kw) -> str:
    """The tool's message (exit 2, no traceback), from 'prepare_imagenet: ' on."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run_tool(archives, out, *extra, **kw) == 2, err.getvalue()
    message = err.getvalue().strip()
    assert message.startswith("prepare_imagenet: ") and "Traceback" not in message, message
    return message


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def json_meta_mat(monkeypatch):
    """Stand-in for scipy's loadmat: the test devkit's meta.mat holds {id: wnid} as JSON, so the
    devkit path is tested from the tar.gz to the tree without scipy."""
    monkeypatch.setattr(imagenet_archives, "read_meta_mat",
                        lambda path: {int(k): v for k, v in json.loads(Path(path).read_text()).items()})


@pytest.mark.parametrize("labels", ["csv", "devkit"])
def test_archives_give_the_expected_tree(tmp_path, labels, json_meta_mat, capsys):
    expected = build(tmp_path / "archives")
    out = tmp_path / "data" / "imagenet"
    run_tool(tmp_path / "archives", out, *TINY, labels=labels)
    assert read_tree(out) == expected  # every file in its class, byte for byte, nothing else
    assert [p.name for p in out.parent.iterdir()] == ["imagenet"]  # no staging folder left
    assert "3 classes, 9 train and 6 val images" in capsys.readouterr().out

    classes = sorted(TRAIN)
    for split in ("train", "val"):
        ds = ImageFolder(out / split)
        assert ds.classes == classes and ds.class_to_idx == {w: i for i, w in enumerate(classes)}
    val = ImageFolder(out / "val")
    want = sorted((classes.index(w), val_name(i)) for i, w in enumerate(VAL, 1))
    assert [(t, Path(p).name) for p, t in val.samples] == want
    image, label = val[0]
    assert image.size == (8, 6) and label == 0


def test_devkit_read_with_scipy(tmp_path):
    """The real meta.mat reading."""
    (tmp_path / "meta.mat").write_bytes(real_meta_mat())
    assert imagenet_archives.read_meta_mat(tmp_path / "meta.mat") == IDS  # leaves only
    build(tmp_path / "archives", meta_mat=real_meta_mat())
    labels = imagenet_archives.read_devkit(tmp_path / "archives" / "ILSVRC2012_devkit_t12.tar.gz")
    assert labels == {val_name(i)[:-5]: w for i, w in enumerate(VAL, 1)}


def test_devkit_without_scipy_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # makes `import scipy.io` fail
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    build(tmp_path / "archives")
    message = run_failing(tmp_path / "archives", tmp_path / "out", *TINY, labels="devkit")
    assert "needs scipy" in message and "--val-solution LOC_val_solution.csv" in message
    assert not (tmp_path / "out").exists()


# each variant: build() arguments, and the lines the report must contain
BROKEN = {
    "missing class": (dict(train={w: n for w, n in TRAIN.items() if w != "n01484850"}),
                      ["train: 2 classes, expected 3", "1 class in val missing from train: n01484850",
                       "train: 5 images, expected 9 (4 fewer)"]),
    "extra val file": (dict(extra_val=[val_name(7)]),
                       [f"val archive: 1 image with no label: {val_name(7)}"]),
    "wrong val label": (dict(val=VAL[:5] + ["n01440764"]),
                        ["val: 2 classes without 2 images: n01440764 has 3, n01443537 has 1"]),
    "absent val image": (dict(drop_val=[3]),
                         ["val labels: 1 labelled image not in the archive: ILSVRC2012_val_00000003",
                          "val: 5 images, expected 6 (1 fewer)", "n01443537 has 1"]),
    "stray train entry": (dict(stray_train=["README.txt"]),
                          ["train archive: 1 entry not a new nXXXXXXXX.tar class archive, left "
                           "out: README.txt"]),
}


@pytest.mark.parametrize("case", BROKEN)
def test_count_report_names_what_is_off_and_writes_nothing(tmp_path, case):
    kwargs, lines = BROKEN[case]
    build(tmp_path / "archives", **kwargs)
    out = tmp_path / "data" / "imagenet"
    message = run_failing(tmp_path / "archives", out, *TINY)
    for line in lines:
        assert line in message
    assert message.count("\n  ") == len(lines)  # and no other complaint
    assert list(out.parent.iterdir()) == []  # neither the output nor a staging folder


def test_defaults_expect_imagenet(tmp_path):
    assert (Expected().classes, Expected().train_images, Expected().val_per_class,
            Expected().val_images) == (1000, 1_281_167, 50, 50_000)
    build(tmp_path / "archives")
    message = run_failing(tmp_path / "archives", tmp_path / "out", "--no-md5")
    assert "train: 3 classes, expected 1000" in message
    assert "train: 9 images, expected 1281167 (1281158 fewer)" in message
    assert "val: 3 classes without 50 images" in message
    assert not (tmp_path / "out").exists()


def test_md5_checked_unless_told_not_to(tmp_path):
    build(tmp_path / "archives")
    message = run_failing(tmp_path / "archives", tmp_path / "out", *TINY[1:])
    assert "ILSVRC2012_img_val.tar: missing, or its md5 is not" in message
    assert "--no-md5" in message and not (tmp_path / "out").exists()


def test_refuses_to_overwrite_without_the_flag(tmp_path):
    expected = build(tmp_path / "archives")
    out = tmp_path / "imagenet"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert "already exists; pass --overwrite" in run_failing(tmp_path / "archives", out, *TINY)
    assert read_tree(out) == {"mine.txt": b"keep"}
    run_tool(tmp_path / "archives", out, *TINY, "--overwrite")
    assert read_tree(out) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archives", "imagenet"]


def test_failure_mid_extraction_leaves_nothing(tmp_path):
    build(tmp_path / "archives", broken_class="n01443537")
    out = tmp_path / "data" / "imagenet"
    run_failing(tmp_path / "archives", out, *TINY)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("content,words", [
    (b"ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 caf\xe9\n",  # Latin-1
     "not UTF-8 text (byte 0xe9 at offset 62, line 2); expected Kaggle's LOC_val_solution.csv "
     "as downloaded (ImageId,PredictionString rows)"),
    (b"PK\x03\x04 zipped", "a compressed archive, not the CSV itself; unpack it and name the "
                          ".csv inside")])
def test_a_val_solution_that_is_not_utf8_text_is_one_line_before_the_md5s(tmp_path, content,
                                                                          words):
    """Was a UnicodeDecodeError traceback naming no file, after minutes of md5 checks."""
    build(tmp_path / "archives")
    csv_file = tmp_path / "archives" / "LOC_val_solution.csv"
    csv_file.write_bytes(content)
    message = run_failing(tmp_path / "archives", tmp_path / "out", *TINY[1:])  # md5s checked
    assert message == f"prepare_imagenet: --val-solution {csv_file}: {words}"


def test_reading_a_val_solution_that_is_not_utf8_is_one_archive_error(tmp_path):
    from powergrad.data.imagenet_archives import ArchiveError, read_val_solution_csv

    path = tmp_path / "LOC_val_solution.csv"
    path.write_bytes(b"ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3 4\n"
                     b"\xff\xfe broken\n")
    with pytest.raises(ArchiveError, match="not UTF-8 text \\(a byte 0xff\\)"):
        read_val_solution_csv(path)
