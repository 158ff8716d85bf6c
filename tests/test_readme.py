"""The README, followed line by line as a new user would, in a fresh copy of the repository.

Every fenced bash, python or yaml block carries a marker on the line before it:

- `<!-- doctest -->`: bash runs as written (the set-up's environment active), python runs as
  written, and a yaml block whose first line is `# PATH` must be exactly that file;
- `<!-- doctest: tiny -->`: bash runs as written, with `powergrad train` given the settings in
  TINY after its own arguments (the CLI takes them in any order), so a 7-minute recipe trains
  a few steps;
- `<!-- doctest: imagenet -->`: the ImageNet steps, run on tiny fake archives (the ones
  tests/test_imagenet_archives.py builds) with `/data` in a temporary folder; each
  `powergrad train` line also gets the recipe's own /data paths moved there and a tiny model
  and batch, and must read the .beton files the README wrote (so their names agree);
- `<!-- not run: REASON -->`: the reason says why (ImageNet, GPUs, SLURM, installs) and which
  test covers the same path instead.

The blocks run in README order in one copy, so later ones use the runs of earlier ones, and
afterwards `git status` must be clean: nothing a user's command writes lands in tracked files.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TINY = ("train.epochs=1 data.train_subset=256 data.eval_subset=256 train.batch_size=64 "
        "train.eval_batch_size=256 log.log_interval=1")
MARKER = re.compile(r"<!-- (doctest|doctest: tiny|doctest: imagenet|not run: .+) -->")
RUNNABLE_LANGS = {"bash", "sh", "python", "yaml"}


def readme_blocks(text: str) -> list[dict]:
    """Fenced blocks with their language, first line number, marker (or None) and code."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w*)\s*", lines[i])
        if not fence:
            i += 1
            continue
        end = lines.index("```", i + 1)
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.fullmatch(before.strip())
        blocks.append({"lang": fence.group(1), "line": i + 1, "code": "\n".join(lines[i + 1:end]),
                       "marker": marker.group(1) if marker else None})
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def test_every_snippet_says_whether_it_runs():
    unmarked = [b["line"] for b in BLOCKS if b["lang"] in RUNNABLE_LANGS and not b["marker"]]
    assert not unmarked, f"README.md lines {unmarked}: add <!-- doctest --> or <!-- not run: why -->"
    assert sum(b["marker"].startswith("doctest") for b in BLOCKS if b["marker"]) >= 10


@pytest.mark.parametrize("block", [b for b in BLOCKS if b["lang"] == "yaml"
                                   and b["marker"] == "doctest"], ids=lambda b: f"line{b['line']}")
def test_yaml_snippets_are_the_files_they_name(block):
    first, _, body = block["code"].partition("\n")
    path = REPO / first.removeprefix("# ").strip()
    assert first.startswith("# ") and path.is_file(), f"line {block['line']}: names no file"
    assert body.strip() == path.read_text().strip()


def fresh_copy(dest: Path) -> Path:
    """A new git repository holding the tracked files as they are in this working tree, with
    `.venv` standing for the set-up's environment (the one running these tests)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    git = ["git", "-c", "user.name=doctest", "-c", "user.email=doctest@localhost"]
    subprocess.run(git + ["init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "fresh copy"], cwd=dest, check=True)
    (dest / ".venv").symlink_to(Path(sys.prefix))
    # git's `.venv/` pattern matches the real folder, not this link to it
    with open(dest / ".git" / "info" / "exclude", "a") as f:
        f.write("/.venv\n")
    return dest


def run_bash(block: dict, cwd: Path) -> str:
    env = dict(os.environ, PATH=f"{sys.prefix}/bin:{os.environ['PATH']}", VIRTUAL_ENV=sys.prefix,
               OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    prelude = ""
    if block["marker"] == "doctest: tiny":
        prelude = ('powergrad() { if [ "$1" = train ]; then command powergrad "$@" ' + TINY
                   + '; else command powergrad "$@"; fi; }\n')
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", prelude + block["code"]],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"README.md line {block['line']} failed:\n{block['code']}\n{output[-3000:]}"
    return output


def run_python(block: dict, cwd: Path) -> None:
    import torch

    before, threads = Path.cwd(), torch.get_num_threads()
    os.chdir(cwd)
    torch.set_num_threads(1)  # small snippets; the second core runs another test process
    try:
        exec(compile(block["code"], f"README.md line {block['line']}", "exec"), {})
    finally:
        os.chdir(before)
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.readme
def test_following_the_readme_runs_every_snippet_and_leaves_git_clean(tmp_path):
    copy = fresh_copy(tmp_path / "powergrad")
    ran = []
    for block in BLOCKS:
        if block["lang"] not in RUNNABLE_LANGS or block["marker"] not in ("doctest",
                                                                            "doctest: tiny"):
            continue
        if block["lang"] in ("bash", "sh"):
            output = run_bash(block, copy)
            assert "Traceback" not in output, f"line {block['line']}:\n{output[-3000:]}"
            assert not re.search(r"\bnan\b", output, re.IGNORECASE), f"line {block['line']}:\n{output}"
        elif block["lang"] == "python":
            run_python(block, copy)
        ran.append(block["line"])
    assert len(ran) >= 9
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=copy,
                            capture_output=True, text=True, check=True).stdout
    assert status == "", f"the README's commands changed the repository:\n{status}"
    # what the blocks promise exists where they say
    for path in ["runs/fashion_mnist/resnet.md", "runs/fashion_mnist/alpha.png",
                 "runs/vit_study/blocks.md", "runs/fashion_mnist/resnet_pgt/export/config.json",
                 "runs/fashion_mnist/quick/final.json"]:
        assert (copy / path).is_file(), path


IMAGENET_TINY = ["model.num_classes=3", "data.num_classes=3", "train.global_batch=4",
                 "train.batch_size=4", "train.eval_batch_size=6", "data.min_res=64",
                 "data.max_res=64", "data.img_size=64", "data.val_img_size=64"]


def imagenet_commands(code: str) -> list[str]:
    """A block's commands, continuation lines joined, comments left out."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_readme_imagenet_steps_run_on_tiny_fake_archives(tmp_path):
    from helpers_imagenet_archives import TINY as TINY_COUNTS
    from helpers_imagenet_archives import build, real_meta_mat

    from powergrad.config.loading import load_recipe
    from powergrad.config.schema import path_settings

    archives = tmp_path / "archives"
    build(archives, meta_mat=real_meta_mat())
    data = tmp_path / "data"
    env = dict(os.environ, PATH=f"{sys.prefix}/bin:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    blocks = [b for b in BLOCKS if b["marker"] == "doctest: imagenet"]
    assert len(blocks) == 3  # unpack, write .beton files, the fast dev runs
    trained = 0
    for block in blocks:
        for command in imagenet_commands(block["code"]):
            command = command.replace("/data/", f"{data}/")
            for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                         "ILSVRC2012_devkit_t12.tar.gz"):
                command = command.replace(f" {name}", f" {archives / name}")
            args = shlex.split(command)
            if args[:2] == ["python", "tools/prepare_imagenet.py"]:
                args += TINY_COUNTS  # the fake archives' counts, no md5 of the real ones
            if args[:2] == ["powergrad", "train"]:
                recipe = load_recipe(REPO / args[2])
                args += [f"{key}={str(value).replace('/data/', f'{data}/')}"
                         for key in path_settings()
                         if str(value := getattr(getattr(recipe, key.split(".")[0]),
                                                 key.split(".")[1])).startswith("/data/")]
                args += IMAGENET_TINY
            args[0] = sys.executable if args[0] == "python" else args[0]
            done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=300)
            output = done.stdout + done.stderr
            assert done.returncode == 0 and "Traceback" not in output, \
                f"README.md line {block['line']}: {command}\n{output[-3000:]}"
            if args[:2] == ["powergrad", "train"]:
                assert "data: ffcv loader" in output, output  # the .beton names agree
                assert "fast dev run OK: 2 step(s)" in output, output
                trained += 1
    assert trained == 1
    # and every shipped ffcv recipe reads files those lines wrote (a fast dev run each would
    # take half a minute of ffcv's compilation: the one above stands for them)
    for path in sorted((REPO / "recipes").glob("*imagenet/*.yaml")):
        if path.name == "base.yaml":  # the shared settings, before a model picks its files
            continue
        data_cfg = load_recipe(path).data
        for beton in (data_cfg.train_beton, data_cfg.val_beton):
            assert beton and Path(beton.replace("/data/", f"{data}/")).is_file(), (path, beton)
