"""Random damage to the real recipes, study plans and every command's options (`powergrad
torchrun`'s own torchrun options included): the answer is always a result or one error naming
what is wrong, never a traceback.

Each case is drawn from a seeded generator (the case number is its seed), so a failure names a
case that replays. Recipes go through what `powergrad train --fast-dev-run` does before its
first step (load, then preflight: the model on the meta device, the data, the batch plan) and
`describe`; the valid ones are not trained (a fast dev run per case would take minutes), which
tests/test_recipe_smoke.py does for every shipped recipe.
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import runpy
from pathlib import Path

import pytest
import yaml
from helpers_images import textured_folder

from powergrad.commands.cli import main as cli_main
from powergrad.config.loading import RecipeError, load_recipe
from powergrad.config.schema import Recipe, is_free_form

REPO = Path(__file__).resolve().parents[1]
# Small recipes of every kind: a BN ResNet, a BN-free ResNet with AGC, a GPAS ViT (Fashion-
# MNIST), and ImageNet's ResNet-18 and DeiT on a tiny folder.
RECIPES = ["fashion_mnist/resnet_pgt.yaml", "fashion_mnist/nobn_agc_pgt.yaml",
           "fashion_mnist/vit_pre_gpas.yaml", "imagenet/resnet18_cosine_pgt.yaml",
           "imagenet/deit_small_gpas.yaml"]
CASES_PER_TEST = 25
ODD_VALUES = [None, True, "text", "", [], [1, 2], {}, {"a": 1}, 10**30, -1, 0, -0.5, 1e308,
              float("inf"), float("nan"), "1e3", 3.7, 2**31, "~", "/nonexistent/x"]


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_imagenet")
    textured_folder(root / "train", per_class=4)
    textured_folder(root / "val", per_class=1, seed=1)
    return root


def resolved_tree(name: str, tiny_imagenet: Path, out: Path) -> dict:
    """The recipe's settings as one YAML tree, made to run here (tiny data, small sizes)."""
    overrides = [f"log.output={out}"]
    if name.startswith("imagenet/"):
        overrides += [f"data.train_dir={tiny_imagenet / 'train'}",
                      f"data.val_dir={tiny_imagenet / 'val'}", "data.train_beton=null",
                      "data.val_beton=null", "model.num_classes=3", "data.num_classes=3",
                      "train.global_batch=4", "train.batch_size=4"]
        if "deit" not in name:
            overrides += ["data.img_size=32"]
    tree = yaml.safe_load(load_recipe(REPO / "recipes" / name, overrides).to_yaml())
    return tree


def leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and value and not is_free_form(f"{prefix}{key}"):
            keys += leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def set_dotted(tree: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def delete_dotted(tree: dict, key: str) -> None:
    *parents, last = key.split(".")
    for part in parents:
        tree = tree[part]
    del tree[last]


def mutate(tree: dict, rng: random.Random) -> tuple[str, str, bytes]:
    """(kind, the key it touched, the file's bytes) for one random damage of `tree`."""
    key = rng.choice(leaf_keys(tree))
    kind = rng.choice(["swap", "swap", "swap", "delete", "unknown", "scale", "bytes", "section"])
    if kind == "swap":
        set_dotted(tree, key, rng.choice(ODD_VALUES))
    elif kind == "delete":
        delete_dotted(tree, key)
    elif kind == "unknown":
        key = key.rsplit(".", 1)[0] + ".no_such_setting" if "." in key else "no_such_section"
        set_dotted(tree, key, 1)
    elif kind == "scale":  # numbers pushed far out, or to their sign's opposite
        *_, last = key.split(".")
        node = tree
        for part in key.split(".")[:-1]:
            node = node[part]
        value = node[last]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            node[last] = rng.choice([-value - 1, value * 10**9, type(value)(0)])
        else:
            node[last] = rng.choice([-1, 10**9])
    elif kind == "section":
        key = key.split(".")[0]
        tree[key] = rng.choice(ODD_VALUES)
    text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True).encode()
    if kind == "bytes":  # non-UTF-8 bytes at a random place
        at = rng.randrange(len(text))
        text = text[:at] + bytes([rng.choice([0xff, 0xfe, 0xc3, 0x80])]) + text[at:]
    return kind, key, text


def known_key(key: str) -> bool:
    """Whether `key` is a setting or section of a recipe, or an unknown key in a known
    section (what an 'unknown key' error names), or '' for the file as a whole."""
    node = Recipe()
    for part in key.split(".")[:-1]:
        if isinstance(node, dict):
            return True  # a free-form mapping (kwargs, extra, paper)
        if not hasattr(node, part):
            return False
        node = getattr(node, part)
    return True


@pytest.mark.parametrize("chunk", range(8))
def test_damaged_recipes_get_one_error_naming_the_setting(chunk, tiny_imagenet, tmp_path):
    from powergrad.commands.describe import describe
    from powergrad.commands.train import checked_recipes

    failures, refused = [], 0
    for case in range(chunk * CASES_PER_TEST, (chunk + 1) * CASES_PER_TEST):
        rng = random.Random(case)
        name = RECIPES[case % len(RECIPES)]
        kind, key, text = mutate(resolved_tree(name, tiny_imagenet, tmp_path / "runs"), rng)
        path = tmp_path / f"case{case}.yaml"
        path.write_bytes(text)
        try:
            (recipe,) = checked_recipes([str(path)], [], world_size=1, fast_dev_run=1)
            describe(recipe, None)
        except RecipeError as err:
            refused += 1
            message = str(err)
            if "\n" in message or not message.startswith(f"{path}: ") or not known_key(err.key):
                failures.append(f"case {case} ({name}, {kind} {key}): {message!r}")
            elif kind in ("swap", "unknown", "scale") and key not in message and \
                    err.key not in (key, key.split(".")[0]) and not _caused_elsewhere(err):
                failures.append(f"case {case} ({name}, {kind} {key}) named {err.key!r}: "
                                f"{message}")
        except Exception as err:  # anything else is the traceback a user would see
            failures.append(f"case {case} ({name}, {kind} {key}): {type(err).__name__}: {err}")
    assert not failures, "\n".join(failures)
    assert refused >= CASES_PER_TEST // 2, f"only {refused} of {CASES_PER_TEST} cases refused"


def _caused_elsewhere(err: RecipeError) -> bool:
    """A changed value may be legal alone and refused where it meets another setting (a batch
    against the data, a class count against the folders): those checks name the key they
    check, and say what they compared."""
    return err.key in {"train.global_batch", "train.batch_size", "model.num_classes",
                       "data.num_classes", "model.in_chans", "data.img_size", "data.min_res",
                       "data.val_img_size", "model.kwargs", "data.loader", "data.train_dir",
                       "data.train_subset", "train.grad_accum_steps"}


@pytest.mark.parametrize("chunk", range(2))
def test_damaged_study_plans_get_one_error(chunk, tmp_path):
    from powergrad.study.plan import StudyError, load_plan

    plan_file = REPO / "recipes" / "study" / "plan.yaml"
    failures = []
    for case in range(chunk * CASES_PER_TEST, (chunk + 1) * CASES_PER_TEST):
        rng = random.Random(1000 + case)
        tree = yaml.safe_load(plan_file.read_text())
        for arm in tree["arms"].values():  # recipes relative to the copy's folder
            arm["recipe"] = str((plan_file.parent / arm["recipe"]).resolve())
        kind, key, text = mutate(tree, rng)
        path = tmp_path / f"plan{case}.yaml"
        path.write_bytes(text)
        try:
            load_plan(path)
        except StudyError as err:
            if "\n" in str(err) or not str(err).startswith(f"{path}: "):
                failures.append(f"case {case} ({kind} {key}): {err!r}")
        except Exception as err:
            failures.append(f"case {case} ({kind} {key}): {type(err).__name__}: {err}")
    assert not failures, "\n".join(failures)


def option_values(rng: random.Random, tmp_path: Path) -> str:
    """A hostile value for an option: numbers out of range, paths of the wrong kind."""
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    return str(rng.choice([-1, 0, -10**12, 10**12, "nan", "inf", "x", "", "1.5", "-0",
                           a_file, tmp_path, tmp_path / "missing" / "deeper", "/proc/x",
                           a_file / "under_a_file"]))


DEMO = str(REPO / "recipes/fashion_mnist/resnet_pgt.yaml")
COMMANDS = {  # every command's options, and the positional arguments they are tried with
    "train": (["--fast-dev-run", "--compare"], [DEMO]),
    "describe": (["--png"], [DEMO]),
    "compare": (["--target", "--out"], ["RUN"]),
    "export": (["--checkpoint", "--out"], ["RUN"]),
    "check-data": (["--workers"], ["DIR"]),
    "study": (["--max-minutes", "--claims", "--runs", "--records", "--sbatch", "--array-limit",
               "--only"], ["PLAN", "--status"]),
}
# `powergrad torchrun`'s own options (torchrun's, before the subcommand)
TORCHRUN_OPTIONS = ["--nproc_per_node", "--nnodes", "--max_restarts", "--monitor_interval",
                    "--node_rank", "--master_port", "--rdzv_backend", "--rdzv_endpoint",
                    "--rdzv_conf", "--log_dir", "--shutdown-timeout", "--signals-to-handle",
                    "--local_ranks_filter", "--redirects", "--nproc-per-node", "--tee"]


class Launched(BaseException):
    """NoWorkers.run was reached: torchrun took the options as far as starting workers. A
    BaseException, so neither torchrun nor the one error path takes it for a failure."""


class NoWorkers:
    """torchrun's agent (LocalElasticAgent) without its workers: everything the launcher and
    torch do with the options up to the workers' start runs for real (the parse, the checks,
    the launch config, the worker spec, the rendezvous handler), then this stops; a legal
    value would otherwise start two trainings per case."""

    def __init__(self, spec, **kwargs):
        assert spec.local_world_size >= 1 and spec.max_restarts >= 0

    def run(self):
        raise Launched


TOOLS = {
    "write_ffcv": ["--max-resolution", "--compress-probability", "--jpeg-quality", "--workers",
                   "--limit", "--split"],
    "prepare_imagenet": ["--train", "--val", "--val-solution", "--expected-classes",
                         "--expected-train-images", "--expected-val-per-class"],
}


def outcome(call) -> tuple[int, str]:
    """(exit code, stderr) of a command run in this process, argparse's exits included."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = call()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 2
        except Launched:  # torchrun would start its workers now: the options were legal
            code = 0
    return code, err.getvalue()


@pytest.mark.parametrize("chunk", range(4))
def test_hostile_options_get_one_error_naming_the_option(chunk, tmp_path, tiny_imagenet,
                                                        finished_run, monkeypatch):
    """Commands with fast paths only: a --fast-dev-run value that is legal trains on 40
    images, compare/export get a copy of the suite's finished tiny run (tests/conftest.py). They run in a scratch folder: a value
    such as `x` or `nan` is a legal relative output path, and must not land in the checkout."""
    monkeypatch.chdir(tmp_path)
    failures = []
    for case in range(chunk * CASES_PER_TEST, (chunk + 1) * CASES_PER_TEST):
        rng = random.Random(2000 + case)
        value = option_values(rng, tmp_path)
        if case % 3 == 2:
            tool = rng.choice(sorted(TOOLS))
            option = rng.choice(TOOLS[tool])
            argv = {"write_ffcv": ["imagefolder", str(tiny_imagenet / "train"),
                                   str(tmp_path / f"w{case}.beton")],
                    "prepare_imagenet": [str(tmp_path / f"p{case}"), "--train", "a", "--val",
                                         "b", "--val-solution", "c"],
                    }[tool] + [option, value]
            main = runpy.run_path(str(REPO / "tools" / f"{tool}.py"))["main"]
            code, err = outcome(lambda: main(argv))
            where = f"case {case}: {tool} {' '.join(argv)}"
        else:
            command = rng.choice(sorted(COMMANDS))
            options, positional = COMMANDS[command]
            option = rng.choice(options)
            positional = [{"RUN": str(finished_run), "DIR": str(tiny_imagenet / "val"),
                           "PLAN": str(REPO / "recipes" / "study" / "plan.yaml")}.get(p, p)
                          for p in positional]
            argv = [command, *positional, option, value]
            if command == "train":
                argv += ["data.train_subset=40", "train.batch_size=20", "train.epochs=1",
                         "data.eval_subset=20", f"log.output={tmp_path / 'runs'}"]
            code, err = outcome(lambda: cli_main(argv))
            where = f"case {case}: powergrad {' '.join(argv)}"
        if "Traceback" in err or "this is a bug" in err or code not in (0, 2):
            failures.append(f"{where}: exit {code}\n{err[-1500:]}")
        elif code == 2 and option not in err and value not in err and "argument" not in err:
            failures.append(f"{where}: the message names neither the option nor the value: "
                            f"{err.strip()!r}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("chunk", range(2))
def test_hostile_torchrun_options_get_one_line_naming_the_option(chunk, tmp_path, monkeypatch):
    """`powergrad torchrun`'s own options (each in turn, a hostile value each time): one line
    naming the option or its value, exit 2, before anything starts; or, legal, as far as
    torchrun starting its workers (NoWorkers stands in for them: no training per case).
    torch asserted on some (--nproc_per_node 0: AssertionError from its WorkerSpec)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("torch.distributed.launcher.api.LocalElasticAgent", NoWorkers)
    for name in ("OMP_NUM_THREADS", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):  # the launcher
        monkeypatch.setenv(name, os.environ.get(name, "1"))  # sets them: put back after
    failures, refused = [], 0
    for case in range(chunk * CASES_PER_TEST, (chunk + 1) * CASES_PER_TEST):
        option = TORCHRUN_OPTIONS[case % len(TORCHRUN_OPTIONS)]
        value = option_values(random.Random(3000 + case), tmp_path)
        argv = ["torchrun", option, value, "train", DEMO, "--fast-dev-run", "1",
                "data.train_subset=40", "train.batch_size=20", "data.eval_subset=20"]
        code, err = outcome(lambda: cli_main(argv))
        where = f"case {case}: powergrad {' '.join(argv)}"
        refused += code == 2
        if "Traceback" in err or "this is a bug" in err or code not in (0, 2):
            failures.append(f"{where}: exit {code}\n{err[-1500:]}")
        elif code == 2 and (len(err.strip().splitlines()) != 1 or not (
                option.strip("-").replace("-", "_") in err.replace("-", "_") or value in err)):
            failures.append(f"{where}: not one line naming the option: {err.strip()!r}")
    assert not failures, "\n\n".join(failures)
    assert refused >= CASES_PER_TEST // 2, f"only {refused} of {CASES_PER_TEST} cases refused"


def test_the_fuzz_mutations_do_damage():
    """The generator reaches every kind of damage (and the recipe test checks that its cases
    are mostly refused: a fuzz test whose cases all pass proves nothing)."""
    kinds = set()
    for case in range(200):
        tree = {"train": {"epochs": 3, "seed": 1}, "optim": {"lr": 0.1}}
        kinds.add(mutate(tree, random.Random(case))[0])
    assert kinds == {"swap", "delete", "unknown", "scale", "bytes", "section"}
