"""Recipes: one YAML file per run, validated before any work starts.

A recipe may name a parent with `extends: other.yaml` (a path relative to the file); the child
overrides the parent key by key, so paper variants differ only in what changes. Command-line
overrides use dotted keys: `optim.lr=0.2 pgt.alpha=0.25`. Leaf keys are named after timm's
train.py arguments where one exists (opt, lr, sched, warmup_epochs, smoothing, mixup,
clip_grad, clip_mode, model_ema, grad_accum_steps, ...).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

# Allowed values live on the fields as Literal types: _coerce checks them, and the modules
# that consume a value import the same alias instead of repeating the list.
NormKind = Literal["batch", "none"]
StemKind = Literal["default", "small"]
GPASVariant = Literal["pre", "sandwich", "deepnorm", "lns"]
GPASGate = Literal["block", "add"]
DatasetName = Literal["fashion_mnist", "imagefolder"]
LoaderName = Literal["auto", "ffcv", "torchvision", "dali"]
BadImages = Literal["error", "skip"]
EraseMode = Literal["pixel", "const", "rand"]
Interpolation = Literal["bilinear", "bicubic"]
MixupMode = Literal["batch", "pair", "elem"]
ClipMode = Literal["none", "norm", "value", "agc"]
DeviceName = Literal["auto", "cpu", "cuda"]
AmpDtype = Literal["float32", "bfloat16", "float16"]
SchedName = Literal["cosine", "tanh", "step", "multistep", "plateau", "poly", "wsd", "none"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class GPASConfig:
    enabled: bool = False
    variant: GPASVariant = "pre"  # see powergrad/gpas.py
    gate: GPASGate = "block"  # block: one gate per block for both adds (official)
    learnable: bool = True
    init: float = 0.0
    stop_gradient: bool = True  # False only for the paper's ablation
    # deepnorm only. baseline: DeepNet's scaled init for the ungated model alone, timm's init
    # under GPAS, as the official GPAS code does (see powergrad/gpas.py); always: both.
    deepnorm_scaled_init: Literal["baseline", "always"] = "baseline"


@dataclass
class ModelConfig:
    model: str = "resnet18"  # any timm model name
    num_classes: int = 10
    in_chans: int = 3
    drop_rate: float = 0.0  # timm --drop
    drop_path: float = 0.0  # timm --drop-path
    norm: NormKind = "batch"  # none: nn.Identity, the PGT paper's BN-free ResNet
    stem: StemKind = "default"  # small: 3x3 stem conv at `stem_stride`, no max-pool
    stem_stride: int = 1
    # ffcv-imagenet's BlurPool: a fixed 3x3 binomial blur in front of every stride-2 conv
    # with >= 16 input channels (timm's aa_layer blurs after the conv instead, and not the
    # shortcut's 1x1 conv, so it is a different network).
    blurpool: bool = False
    kwargs: dict = field(default_factory=dict)  # more timm.create_model keyword arguments
    gpas: GPASConfig = field(default_factory=GPASConfig)
    # Fine-tuning (timm's --pretrained and --initial-checkpoint): start from timm's released
    # weights, which must already be in the Hugging Face cache (nothing is downloaded at run
    # time), or from a file or folder: a run folder (its best.pth), a run's .pth, an export
    # (model.safetensors), or a timm state-dict file. A classifier of another class count is
    # re-initialised, with a note (powergrad/training/finetune.py).
    pretrained: bool = False
    initial_checkpoint: str | None = None


@dataclass
class DataConfig:
    # fashion_mnist: Debian's IDX files in memory; imagefolder: ImageNet-style data read
    # from .beton files with ffcv or from ImageFolder trees with torchvision.
    dataset: DatasetName = "fashion_mnist"
    root: str = "/usr/share/datasets/fashion-mnist"  # fashion_mnist only
    loader: LoaderName = "auto"  # imagefolder only
    train_dir: str | None = None  # ImageFolder tree: train/<class>/*.JPEG
    val_dir: str | None = None
    train_beton: str | None = None  # ffcv files written by tools/write_ffcv.py
    val_beton: str | None = None
    workers: int = 2
    img_size: int = 224  # train resolution when min_res/max_res are not set
    val_img_size: int | None = None  # defaults to img_size
    crop_pct: float = 0.875  # validation centre crop, 224/256
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect range
    hflip: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Progressive resizing as in ffcv-imagenet: resolution ramps linearly from min_res at
    # start_ramp to max_res at end_ramp (epochs), rounded to a multiple of 32.
    min_res: int | None = None
    max_res: int | None = None
    start_ramp: int = 0
    end_ramp: int = 0
    # ffcv: True reads the file through the OS page cache (ffcv-imagenet's in_memory=1, for
    # nodes whose memory holds the data set); False lets ffcv page it itself, which also
    # allows its QUASI_RANDOM order on one process.
    os_cache: bool = True
    # Fashion-MNIST augmentation: random shift by up to `pad` pixels and horizontal flip.
    pad: int = 2
    # Use only the first N train / eval examples (smoke tests, quick studies); null = all.
    train_subset: int | None = None
    eval_subset: int | None = None
    num_classes: int | None = None  # checked against the data when set
    # An image that cannot be decoded while training (torchvision loader): error stops with
    # one line naming it; skip trains on the next image instead and counts it (TensorBoard's
    # data/bad_images, final.json). `powergrad check-data` lists them all before a run.
    bad_images: BadImages = "error"
    # timm's train.py augmentations (the torchvision loader; powergrad/data/augment.py):
    aa: str | None = None  # RandAugment/AutoAugment policy, e.g. rand-m9-mstd0.5-inc1
    reprob: float = 0.0  # random erasing probability (after normalisation)
    remode: EraseMode = "pixel"  # erased values: per-pixel N(0, 1), per-channel, or 0
    recount: int = 1  # at most this many erased rectangles per image
    aug_repeats: int = 0  # repeated augmentation: each image this many times (0: off)
    train_interpolation: Interpolation = "bilinear"  # of the training crop's resize
    color_jitter: float | None = None  # brightness/contrast/saturation jitter, when no aa
    extra: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    opt: str = "sgd"  # timm create_optimizer_v2 name; 'sgd' is Nesterov SGD
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    filter_bias_and_bn: bool = True  # no weight decay on 1-D parameters (bias, norm)
    opt_eps: float | None = None
    opt_betas: tuple[float, float] | None = None


@dataclass
class SchedConfig:
    sched: SchedName = "cosine"  # timm create_scheduler_v2's names
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    cooldown_epochs: int = 0
    decay_epochs: float = 30.0  # step
    decay_milestones: list[int] = field(default_factory=lambda: [30, 60, 90])  # multistep
    decay_rate: float = 0.1
    decay_fn: str = "linear"  # wsd's decay shape, ffcv-imagenet's triangular schedule


@dataclass
class LossConfig:
    smoothing: float = 0.0  # label smoothing
    mixup: float = 0.0  # mixup alpha, timm --mixup
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: MixupMode = "batch"


@dataclass
class PGTConfig:
    enabled: bool = False
    alpha: float = 1.0  # 1 = ordinary gradient; the paper uses 0.05 - 0.3 (0.92 once)
    # The study's emulation of the authors' fp16 hook (p rounded to float16 first, so p below
    # ~3e-8 counts as 0); false = the paper's formula, exact (powergrad/transform.py)
    emulate_fork_fp16: bool = False


@dataclass
class ClipConfig:
    clip_mode: ClipMode = "none"
    clip_grad: float = 0.01  # max norm, max value, or AGC's clip factor
    exclude_head: bool = True  # AGC skips the classifier, as timm's train.py and the paper


@dataclass
class TrainConfig:
    epochs: int = 10  # timm's --epochs; the schedule's cool-down epochs come on top
    # Images per optimizer step over all processes. When set, `batch_size` is the largest
    # micro-batch one process may take and the micro-batch and accumulation are derived from
    # the world size (powergrad/config/batching.py); null: batch_size x processes x grad_accum_steps.
    global_batch: int | None = None
    batch_size: int = 256  # per process (timm's --batch-size)
    eval_batch_size: int = 1000
    grad_accum_steps: int = 1
    seed: int = 0
    device: DeviceName = "auto"
    amp_dtype: AmpDtype = "float32"  # float16 uses a GradScaler
    channels_last: bool = False
    torchcompile: bool = False
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    tta_flip: bool = False  # evaluate on the mean of the image's and its mirror's logits
    threads: int | None = None  # torch CPU threads; null = torch's default
    # BatchNorm over all processes' micro-batches (timm's --sync-bn); matters when the
    # per-process batch is small: the paper's BN saw 256 images per GPU
    sync_bn: bool = False


@dataclass
class LogConfig:
    output: str = "runs"  # the run lands in output/experiment
    experiment: str | None = None  # default: the recipe file's name
    log_interval: int = 50  # optimizer steps between scalar logs
    diagnostics: bool = True  # PGT logit stats, clipping stats (and GPAS probes)
    # conv filters whose weight norm fell below 1 % of its initial value, per layer, every
    # log_interval steps (powergrad/training/filters.py: the BN-free "filters zero out" observation)
    filter_collapse: bool = False
    # auto: continue from the run directory's newest readable checkpoint | none | a path
    # (a training checkpoint: last.pth or step-*.pth; the run directory's own newer one wins)
    resume: str = "auto"
    checkpoint: bool = True  # last.pth every epoch and on SIGTERM, best.pth (weights only)
    checkpoint_every: int = 0  # also step-N.pth every N optimizer steps (0: off)
    keep_checkpoints: int = 2  # step checkpoints kept, newest first
    # run.lock without a heartbeat for this many seconds is stale, whatever host wrote it
    # (the holder beats every min(30, this / 4) s), so a requeue on another node takes over
    lock_stale_after: float = 120.0


@dataclass
class Recipe:
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pgt: PGTConfig = field(default_factory=PGTConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # The paper's reported numbers for this row, shown beside measured ones by `compare`,
    # e.g. {source: "PGT Table 1", train_top1: 79.68, test_top1: 77.216}.
    paper: dict = field(default_factory=dict)
    source: str = ""  # the file it was loaded from (set by load_recipe)
    # dotted key -> the file (or command line) that set it; not a setting (set by load_recipe)
    origins: dict = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The settings as plain nested dicts (the loaded-from bookkeeping left out)."""
        tree = dataclasses.asdict(self)
        tree.pop("origins")
        return tree

    def to_yaml(self) -> str:
        """The resolved settings as YAML that load_recipe reads back (no `extends`)."""
        tree = _plain(self.to_dict())
        tree.pop("source")
        return yaml.safe_dump(tree, sort_keys=False)

    def flat(self) -> dict[str, object]:
        """Every leaf setting by dotted key (`optim.lr`), the free-form `paper` left out."""
        tree = self.to_dict()
        return dict(_flatten({k: v for k, v in tree.items() if k not in ("paper", "source")}))

    @staticmethod
    def decides_training(key: str) -> bool:
        """Whether a dotted key changes what trains. Logging, checkpointing, the run's name
        and folder, CPU threads and the paper's numbers do not: a run may resume with other
        values of those."""
        section = key.split(".")[0]
        return section not in ("description", "paper", "source", "log") and key != "train.threads"

    def digest(self) -> str:
        """A short hash of the settings that decide what trains (Recipe.decides_training).
        Settings added after runs were recorded count only when set away from their default,
        so those runs' digests (run folders, the study's records) still match."""
        settings = {k: v for k, v in self.flat().items() if self.decides_training(k)
                    and not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])}
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()
                              ).hexdigest()[:12]


# Settings added after the first recorded runs, with the default those runs trained with.
ADDED_SETTINGS = {"train.sync_bn": False, "data.bad_images": "error",
                  "model.pretrained": False, "model.initial_checkpoint": None,
                  "data.aa": None, "data.reprob": 0.0, "data.remode": "pixel", "data.recount": 1,
                  "data.aug_repeats": 0, "data.train_interpolation": "bilinear",
                  "data.color_jitter": None}


# Every numeric setting's range, in interval notation ("[" includes the bound, "(" excludes
# it); a list setting's items are each checked. Checked when a recipe loads, so a bad value
# fails in a second, not after an epoch.
RANGES = {
    "model.num_classes": "[1, inf)",
    "model.in_chans": "[1, inf)",
    "model.drop_rate": "[0, 1)",
    "model.drop_path": "[0, 1)",
    "model.stem_stride": "[1, inf)",
    "data.workers": "[0, inf)",
    "data.img_size": "[1, inf)",
    "data.val_img_size": "[1, inf)",
    "data.crop_pct": "(0, 1]",
    "data.scale": "(0, 1]",
    "data.ratio": "(0, inf)",
    "data.hflip": "[0, 1]",
    "data.std": "(0, inf)",
    "data.min_res": "[1, inf)",
    "data.max_res": "[1, inf)",
    "data.start_ramp": "[0, inf)",
    "data.end_ramp": "[0, inf)",
    "data.pad": "[0, inf)",
    "data.train_subset": "[1, inf)",  # null means all; 0 or negative would mean nothing
    "data.eval_subset": "[1, inf)",
    "data.num_classes": "[1, inf)",
    "data.reprob": "[0, 1]",
    "data.recount": "[1, inf)",
    "data.aug_repeats": "[0, inf)",
    "data.color_jitter": "[0, inf)",
    "optim.lr": "[0, inf)",
    "optim.momentum": "[0, 1]",
    "optim.weight_decay": "[0, inf)",
    "optim.opt_eps": "(0, inf)",
    "optim.opt_betas": "[0, 1)",
    "sched.warmup_epochs": "[0, inf)",
    "sched.warmup_lr": "[0, inf)",
    "sched.min_lr": "[0, inf)",
    "sched.cooldown_epochs": "[0, inf)",
    "sched.decay_epochs": "(0, inf)",
    "sched.decay_milestones": "[0, inf)",
    "sched.decay_rate": "(0, inf)",  # poly's power too, so above 1 is allowed
    "loss.smoothing": "[0, 1)",
    "loss.mixup": "[0, inf)",
    "loss.cutmix": "[0, inf)",
    "loss.mixup_prob": "[0, 1]",
    "loss.mixup_switch_prob": "[0, 1]",
    "pgt.alpha": "[0, 1]",
    "clip.clip_grad": "(0, inf)",
    "train.epochs": "[1, inf)",
    "train.global_batch": "[1, inf)",
    "train.batch_size": "[1, inf)",
    "train.eval_batch_size": "[1, inf)",
    "train.grad_accum_steps": "[1, inf)",
    "train.seed": "[0, 2147483647]",  # numpy seeds take 32 bits; the rank is added to it
    "train.model_ema_decay": "[0, 1]",
    "train.threads": "[1, inf)",
    "log.log_interval": "[1, inf)",
    "log.checkpoint_every": "[0, inf)",
    "log.keep_checkpoints": "[1, inf)",
    "log.lock_stale_after": "(0, inf)",
}


def in_interval(value: float, interval: str) -> bool:
    """Whether `value` lies in an interval written as in RANGES, e.g. "(0, 1]"."""
    match = re.fullmatch(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])", interval)
    if match is None:
        raise ValueError(f"not an interval: {interval!r}")
    opening, low, high, closing = match.groups()
    low, high = float(low), float(high)
    above = value > low if opening == "(" else value >= low
    below = value < high if closing == ")" else value <= high
    return above and below


class RecipeError(ValueError):
    """A recipe problem, naming the file, the key, the value and what was expected."""

    def __init__(self, file: str, key: str, message: str):
        self.file, self.key = file, key
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags that build Python objects) reading floats as YAML 1.2
    does: YAML 1.1 wants a dot and a signed exponent, so `1e-3` would load as a string."""


# YAML 1.2's float (a dot or an exponent required, so integers stay integers), plus 1.1's
# `_` digit separators; in the float resolver's own slot, so it is still tried before int.
_FLOAT_TAG = "tag:yaml.org,2002:float"
_YAML12_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, _YAML12_FLOAT if tag == _FLOAT_TAG else regexp) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


class UnreadableYaml(ValueError):
    """A file that is not UTF-8 or not valid YAML; the message says which and where."""


def read_yaml_file(path: Path):
    """parse_yaml of a file, or UnreadableYaml in one line (recipes, study plans)."""
    try:
        return parse_yaml(Path(path).read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as err:
        raise UnreadableYaml(f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                             f"{err.start}); expected YAML") from None
    except yaml.YAMLError as err:
        raise UnreadableYaml(f"not valid YAML: {yaml_error_line(err)}") from None


def yaml_error_line(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what is wrong and where (its own text spans several)."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    what = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    return " ".join((f"{where}{what}" + (f" ({context})" if context else "")).split())


def parse_yaml(text: str, file: str):
    """Load YAML text with RecipeLoader, refusing a key set twice in one mapping (PyYAML
    silently keeps the last one). None for an empty document."""
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, file, prefix="", visited=set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node, file: str, prefix: str, visited: set) -> None:
    if id(node) in visited:  # an alias seen before (anchors may even nest themselves)
        return
    visited.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, file, prefix, visited)
    elif isinstance(node, yaml.MappingNode):
        first_line = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if key in first_line:
                lines = (f"line {line}" if line == first_line[key]
                         else f"lines {first_line[key]} and {line}")
                raise RecipeError(file, f"{prefix}{key}",
                                  f"set twice, on {lines}; expected each key once")
            first_line[key] = line
            _refuse_duplicate_keys(value_node, file, f"{prefix}{key}.", visited)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file (following `extends:`), apply `key=value` overrides, validate."""
    path = Path(path)
    tree, origins = _load_tree(path, chain=())
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value, file=str(path))
        origins[key] = f"command line ({item})"
    recipe = _build(Recipe, tree, prefix="", origins=origins, default_file=str(path))
    recipe.source = str(path)
    _expand_paths(recipe, origins, str(path))
    if is_run_recipe(path):  # a run folder's own copy continues that run, from any folder
        for key, value in (("log.output", str(path.parent.parent)),
                           ("log.experiment", path.parent.name)):
            if not origins.get(key, "").startswith("command line"):
                setattr(recipe.log, key.split(".")[1], value)
    recipe.origins = dict(origins)
    _check_semantics(recipe, origins, str(path))
    return recipe


def _load_tree(path: Path, chain: tuple) -> tuple[dict, dict]:
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise RecipeError(str(path), "", f"recipe file not found{where}")
    if path.resolve() in chain:
        raise RecipeError(str(path), "extends", "circular extends: "
                          + " -> ".join(str(p) for p in chain + (path,)))
    try:
        tree = read_yaml_file(path)
    except UnreadableYaml as err:
        raise RecipeError(str(path), "", str(err)) from None
    if tree is None:  # all defaults is never what an empty file meant
        raise RecipeError(str(path), "", "the file is empty; expected sections such as "
                                         "model, data, train (or `extends: base.yaml`)")
    if not isinstance(tree, dict):
        raise RecipeError(str(path), "", f"expected a mapping of sections, got {type(tree).__name__}")
    parent_name = tree.pop("extends", None)
    base, origins = ({}, {})
    if parent_name is not None:
        if not isinstance(parent_name, str):
            raise RecipeError(str(path), "extends", f"expected a file path, got {parent_name!r}")
        base, origins = _load_tree(path.parent / parent_name, chain + (path.resolve(),))
    _merge(base, tree, origins, str(path), prefix="")
    return base, origins


def _merge(base: dict, child: dict, origins: dict, file: str, prefix: str) -> None:
    for key, value in child.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict) and not _is_free_form(dotted):
            _merge(base[key], value, origins, file, dotted + ".")
        else:
            base[key] = value
            origins[dotted] = file
            for sub in _leaf_keys(value, dotted):
                origins[sub] = file


def _leaf_keys(value, prefix: str):
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{prefix}.{k}"
            yield from _leaf_keys(v, f"{prefix}.{k}")


def _is_free_form(dotted: str) -> bool:
    return dotted in ("model.kwargs", "data.extra", "paper")


def _parse_override(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise RecipeError("command line", item, "expected key=value (e.g. optim.lr=0.2)")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), parse_yaml(raw, f"command line ({item})") if raw != "" else None
    except yaml.YAMLError:
        return key.strip(), raw


def _set_dotted(tree: dict, key: str, value, file: str) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(file, key, f"{part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls, tree, prefix: str, origins: dict, default_file: str):
    """Turn a nested dict into the dataclass `cls`, checking every key and type."""
    if not isinstance(tree, dict):
        raise RecipeError(origins.get(prefix.rstrip("."), default_file), prefix.rstrip("."),
                          f"expected a section (mapping), got {tree!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in ("source", "origins")]
    values = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        file = origins.get(dotted, default_file)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise RecipeError(file, dotted, f"unknown key (valid: {', '.join(names)}){hint}")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            values[key] = _build(hint_type, value, dotted + ".", origins, default_file)
        else:
            values[key] = _coerce(value, hint_type, file, dotted)
    return cls(**values)


def _coerce(value, hint, file: str, key: str):
    """Check `value` against a type hint (int, float, bool, str, X | None, list, tuple, dict)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], file, key)
    expected = _describe(hint)
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint_text = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(file, key, f"got {value!r}, expected one of "
                                     f"{', '.join(map(str, args))}{hint_text}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML's .nan / .inf
                raise RecipeError(file, key, f"got {value!r}, expected a finite number")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            raise RecipeError(file, key, f"expected {expected}, got {value!r}")
        items = [_coerce(v, args[0] if args else object, file, key) for v in value]
        return tuple(items) if origin is tuple else items
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif hint is object:
        return value
    raise RecipeError(file, key, f"expected {expected}, got {value!r}")


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple):
        count = len(args) if origin is tuple else "any number of"
        return f"a list of {count} {_PLURAL.get(args[0], 'values')}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(hint, str(hint))


_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def _get_dotted(recipe: Recipe, key: str):
    node = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _check_semantics(recipe: Recipe, origins: dict, default_file: str) -> None:
    def fail(key: str, message: str):
        raise RecipeError(origins.get(key, default_file), key, message)

    for key, interval in RANGES.items():
        value = _get_dotted(recipe, key)
        if value is None:  # an optional setting left unset
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(in_interval(item, interval) for item in items):
            each = "each item" if isinstance(value, (list, tuple)) else "a value"
            fail(key, f"got {value!r}, expected {each} in {interval}")
    for key in ("data.scale", "data.ratio"):
        low, high = _get_dotted(recipe, key)
        if low > high:
            fail(key, f"got {[low, high]!r}, expected [low, high] with low <= high")
    if recipe.optim.opt.lower() in ("sgd", "nesterov") and recipe.optim.momentum == 0:
        fail("optim.momentum", f"got 0 with optim.opt {recipe.optim.opt!r}, which is Nesterov "
                               "SGD in timm and needs momentum; expected a value in (0, 1], "
                               "or optim.opt: momentum for plain SGD")
    milestones = recipe.sched.decay_milestones
    if any(a >= b for a, b in zip(milestones, milestones[1:])):
        fail("sched.decay_milestones", f"got {milestones!r}, expected increasing epochs")
    import timm  # imported here: recipe loading stays fast until a model name must be checked
    if not timm.is_model(recipe.model.model):
        close = difflib.get_close_matches(recipe.model.model, timm.list_models(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        fail("model.model", f"{recipe.model.model!r} is not a timm model{hint}")
    if recipe.model.gpas.enabled and recipe.model.norm == "none":
        fail("model.norm", "norm: none is for ResNets; GPAS models keep their LayerNorms")
    data = recipe.data
    if data.dataset == "imagefolder" and not (data.train_beton or data.train_dir):
        fail("data.train_dir", "dataset imagefolder needs train_dir (ImageFolder) or train_beton (ffcv)")
    if (data.min_res is None) != (data.max_res is None):
        fail("data.min_res", "set both min_res and max_res for progressive resizing, or neither")
    if data.min_res is not None and data.min_res > data.max_res:
        fail("data.min_res", f"got {data.min_res}, expected at most data.max_res ({data.max_res})")
    if data.start_ramp > data.end_ramp:
        fail("data.start_ramp", f"got {data.start_ramp}, expected at most data.end_ramp "
                                f"({data.end_ramp})")


RUN_RECIPE = "recipe.yaml"
_RUN_RECIPE_HEADER = "# resolved from "

# Settings that name files or folders: `~` and $VARIABLES are expanded as a shell would.
PATH_KEYS = ("data.root", "data.train_dir", "data.val_dir", "data.train_beton",
             "data.val_beton", "log.output", "log.resume", "model.initial_checkpoint")


def _expand_paths(recipe: Recipe, origins: dict, default_file: str) -> None:
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if not isinstance(value, str):
            continue
        expanded = os.path.expandvars(os.path.expanduser(value))
        if "$" in expanded:
            unset = re.search(r"\$\{?(\w+)", expanded).group(1)
            raise RecipeError(origins.get(key, default_file), key,
                              f"got {value!r}: the environment variable {unset} is not set; "
                              "expected a path (set it, or write the path out)")
        setattr(getattr(recipe, section), name, expanded)


def file_value(recipe: Recipe, key: str):
    """`key`'s value in the recipe's files alone (its `extends` chain, no command line);
    None when the files do not set it."""
    tree, _ = _load_tree(Path(recipe.source), chain=())
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def is_run_recipe(path: Path) -> bool:
    """Whether `path` is the recipe.yaml a run wrote into its folder (dump_recipe)."""
    if path.name != RUN_RECIPE or not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(_RUN_RECIPE_HEADER)) == _RUN_RECIPE_HEADER.encode()


def dump_recipe(recipe: Recipe, path: Path, ran_with: dict | None = None) -> None:
    """Save the resolved recipe (no `extends`), loadable again with load_recipe; loaded from a
    run folder, it continues that run (is_run_recipe). A run continued from that copy keeps
    the name of the file it was first resolved from. `ran_with` (what the machine decided:
    the loader auto picked, the autocast dtype) goes in as comments: not settings."""
    source = recipe.source
    if source and is_run_recipe(Path(source)):
        with open(source) as f:
            source = f.readline()[len(_RUN_RECIPE_HEADER):].strip()
    comments = "".join(f"# ran with {key}: {value}\n" for key, value in (ran_with or {}).items()
                       if key != "notes")
    path.write_text(f"{_RUN_RECIPE_HEADER}{source}\n{comments}" + recipe.to_yaml())


def _plain(value):
    """Tuples to lists, so the saved YAML loads back with yaml.safe_load."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and not _is_free_form(f"{prefix}{key}"):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
