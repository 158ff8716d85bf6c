"""The recipe schema: every setting declared once, on its field, with its type, its default,
its allowed range and a one-line meaning (`setting`), and what else is true of it: a path, a
setting that does not change what trains, the date it was added. Loading checks the type and
range from here (loading.py); recipes/SETTINGS.md is generated from here (tools/recipes_table.py).

Leaf keys are named after timm's train.py arguments where one exists (opt, lr, sched,
warmup_epochs, smoothing, mixup, clip_grad, clip_mode, model_ema, grad_accum_steps, ...).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml

# Allowed values live on the fields as Literal types: loading checks them, and the modules
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
# timm's schedules the loop can step once per update (timm's plateau steps per epoch on a metric)
SchedName = Literal["cosine", "tanh", "step", "multistep", "poly", "wsd", "none"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

def setting(default, meaning: str, range: str | None = None, *, path: bool = False,
            added_in: str | None = None, decides_training: bool = True):
    """A recipe key: its default, what it means in one line, and for a number (or each item of
    a list of numbers) the interval it must lie in, as "[0, 1)" ("[" includes the bound).

    path: the value names a file or folder; loading expands `~` and $VARIABLES in it.
    added_in: the date the setting came, after runs had been recorded; at its default it is
    left out of the digest, so the digests of those runs (run folders, study records) still
    match. decides_training=False: another value trains the same model (logging, the run's
    folder, CPU threads): a run may resume with it changed, and the digest leaves it out."""
    metadata = {"meaning": meaning, "range": range, "path": path, "added_in": added_in,
                "decides_training": decides_training}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls, *, decides_training: bool = True):
    """A recipe section; decides_training=False marks every setting in it (setting())."""
    return field(default_factory=cls, metadata={"decides_training": decides_training})


def default_of(f: dataclasses.Field):
    """A dataclass field's default value (a fresh copy of a list or dict)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def in_interval(value: float, interval: str) -> bool:
    """Whether `value` lies in an interval written as on a setting, e.g. "(0, 1]"."""
    match = re.fullmatch(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])", interval)
    if match is None:
        raise ValueError(f"not an interval: {interval!r}")
    opening, low, high, closing = match.groups()
    low, high = float(low), float(high)
    above = value > low if opening == "(" else value >= low
    below = value < high if closing == ")" else value <= high
    return above and below


@dataclass
class GPASConfig:
    enabled: bool = setting(False, "gate the residual stream of each pre-LN block (powergrad/gpas.py)")
    variant: GPASVariant = setting("pre", "the block layout GPAS wraps")
    gate: GPASGate = setting("block", "block: one gate per block for both adds (official); add: one per add")
    learnable: bool = setting(True, "the gate's parameter trains")
    init: float = setting(0.0, "the gate parameter's initial value")
    stop_gradient: bool = setting(True, "the gate's backward passes the gradient unchanged (false: the paper's ablation)")
    deepnorm_scaled_init: Literal["baseline", "always"] = setting(
        "baseline", "deepnorm only: DeepNet's scaled init for the ungated model alone (as the "
        "official GPAS code) or under GPAS too")


@dataclass
class ModelConfig:
    model: str = setting("resnet18", "any timm model name")
    num_classes: int = setting(10, "classifier outputs", "[1, inf)")
    in_chans: int = setting(3, "image channels", "[1, inf)")
    drop_rate: float = setting(0.0, "dropout before the classifier (timm --drop)", "[0, 1)")
    drop_path: float = setting(0.0, "stochastic depth rate (timm --drop-path)", "[0, 1)")
    norm: NormKind = setting("batch", "none: nn.Identity for BatchNorm, the PGT paper's BN-free ResNet")
    stem: StemKind = setting("default", "small: a 3x3 stem conv at stem_stride, no max-pool")
    stem_stride: int = setting(1, "the small stem's stride", "[1, inf)")
    blurpool: bool = setting(False, "ffcv-imagenet's BlurPool: a 3x3 binomial blur before every "
                                    "stride-2 conv of >= 16 input channels (not timm's aa_layer)")
    kwargs: dict = setting({}, "more timm.create_model keyword arguments")
    gpas: GPASConfig = field(default_factory=GPASConfig)
    pretrained: bool = setting(False, "start from timm's released weights, already in the Hugging "
                                      "Face cache (timm --pretrained; nothing is downloaded)",
                               added_in="2026-12-02")
    initial_checkpoint: str | None = setting(
        None, "start from these weights: a run folder (its best.pth), a .pth, an export or a "
              "timm state dict; another class count re-initialises the classifier",
        path=True, added_in="2026-12-02")


@dataclass
class DataConfig:
    dataset: DatasetName = setting("fashion_mnist", "fashion_mnist: Debian's IDX files in memory; "
                                   "imagefolder: ImageNet-style .beton files or ImageFolder trees")
    root: str = setting("/usr/share/datasets/fashion-mnist", "Fashion-MNIST's folder", path=True)
    loader: LoaderName = setting("auto", "imagefolder's loader; auto picks ffcv when .beton files "
                                         "are set, else torchvision")
    train_dir: str | None = setting(None, "ImageFolder tree: train/<class>/<image>", path=True)
    val_dir: str | None = setting(None, "ImageFolder tree of the evaluation images", path=True)
    train_beton: str | None = setting(None, "ffcv file of the train images (tools/write_ffcv.py)",
                                      path=True)
    val_beton: str | None = setting(None, "ffcv file of the evaluation images", path=True)
    workers: int = setting(2, "loader processes (capped at the usable cores)", "[0, inf)")
    img_size: int = setting(224, "train resolution when min_res/max_res are not set", "[1, inf)")
    val_img_size: int | None = setting(None, "evaluation resolution (default: img_size)", "[1, inf)")
    crop_pct: float = setting(0.875, "evaluation centre crop, 224/256", "(0, 1]")
    scale: tuple[float, float] = setting((0.08, 1.0), "RandomResizedCrop's area range", "(0, 1]")
    ratio: tuple[float, float] = setting((3 / 4, 4 / 3), "RandomResizedCrop's aspect range", "(0, inf)")
    hflip: float = setting(0.5, "horizontal flip probability", "[0, 1]")
    mean: tuple[float, float, float] = setting(IMAGENET_MEAN, "per-channel normalisation mean")
    std: tuple[float, float, float] = setting(IMAGENET_STD, "per-channel normalisation std", "(0, inf)")
    min_res: int | None = setting(None, "progressive resizing (ffcv-imagenet): first resolution, "
                                        "ramped to max_res from start_ramp to end_ramp", "[1, inf)")
    max_res: int | None = setting(None, "progressive resizing: last resolution (multiples of 32)", "[1, inf)")
    start_ramp: int = setting(0, "progressive resizing: epoch the ramp starts", "[0, inf)")
    end_ramp: int = setting(0, "progressive resizing: epoch the ramp ends", "[0, inf)")
    os_cache: bool = setting(True, "ffcv reads through the OS page cache (ffcv-imagenet's "
                                   "in_memory=1); false: ffcv pages it, QUASI_RANDOM order")
    pad: int = setting(2, "Fashion-MNIST: random shift by up to this many pixels", "[0, inf)")
    train_subset: int | None = setting(None, "train on the first N examples only (null: all)", "[1, inf)")
    eval_subset: int | None = setting(None, "evaluate on the first N examples only (null: all)", "[1, inf)")
    num_classes: int | None = setting(None, "checked against the data when set", "[1, inf)")
    bad_images: BadImages = setting("error", "an undecodable image: error stops naming it; skip "
                                             "trains on the next and counts it (torchvision)",
                                   added_in="2026-12-02")
    aa: str | None = setting(None, "RandAugment/AutoAugment policy (timm --aa), e.g. "
                                   "rand-m9-mstd0.5-inc1", added_in="2026-12-02")
    reprob: float = setting(0.0, "random erasing probability, after normalisation (timm --reprob)",
                            "[0, 1]", added_in="2026-12-02")
    remode: EraseMode = setting("pixel", "erased values: per-pixel N(0, 1), per-channel, or 0",
                                added_in="2026-12-02")
    recount: int = setting(1, "at most this many erased rectangles per image", "[1, inf)",
                           added_in="2026-12-02")
    aug_repeats: int = setting(0, "repeated augmentation: each image this many times (0: off)",
                               "[0, inf)", added_in="2026-12-02")
    train_interpolation: Interpolation = setting("bilinear", "the training crop's resize",
                                                 added_in="2026-12-02")
    color_jitter: float | None = setting(None, "brightness/contrast/saturation jitter when no aa",
                                         "[0, inf)", added_in="2026-12-02")
    extra: dict = setting({}, "free-form notes kept with the recipe")


@dataclass
class OptimConfig:
    opt: str = setting("sgd", "timm create_optimizer_v2 name; 'sgd' is Nesterov SGD")
    lr: float = setting(0.1, "peak learning rate", "[0, inf)")
    momentum: float = setting(0.9, "SGD momentum", "[0, 1]")
    weight_decay: float = setting(5e-4, "weight decay", "[0, inf)")
    filter_bias_and_bn: bool = setting(True, "no weight decay on 1-D parameters (bias, norm)")
    opt_eps: float | None = setting(None, "the optimizer's epsilon (timm --opt-eps)", "(0, inf)")
    opt_betas: tuple[float, float] | None = setting(None, "Adam-style betas", "[0, 1)")


@dataclass
class SchedConfig:
    sched: SchedName = setting("cosine", "timm create_scheduler_v2's schedule")
    warmup_epochs: float = setting(0.0, "linear warm-up length", "[0, inf)")
    warmup_lr: float = setting(1e-5, "learning rate at the warm-up's start", "[0, inf)")
    min_lr: float = setting(0.0, "the schedule's floor", "[0, inf)")
    cooldown_epochs: int = setting(0, "epochs at min_lr after train.epochs", "[0, inf)")
    decay_epochs: float = setting(30.0, "step: epochs between decays", "(0, inf)")
    decay_milestones: list[int] = setting([30, 60, 90], "multistep: the decay epochs", "[0, inf)")
    decay_rate: float = setting(0.1, "step/multistep factor; poly's power", "(0, inf)")
    decay_fn: str = setting("linear", "wsd's decay shape (ffcv-imagenet's triangular schedule)")


@dataclass
class LossConfig:
    smoothing: float = setting(0.0, "label smoothing", "[0, 1)")
    mixup: float = setting(0.0, "mixup alpha (timm --mixup)", "[0, inf)")
    cutmix: float = setting(0.0, "cutmix alpha", "[0, inf)")
    mixup_prob: float = setting(1.0, "probability a batch is mixed", "[0, 1]")
    mixup_switch_prob: float = setting(0.5, "probability of cutmix when both are on", "[0, 1]")
    mixup_mode: MixupMode = setting("batch", "one mix per batch, per pair or per element")


@dataclass
class PGTConfig:
    enabled: bool = setting(False, "train on softmax(alpha z) - q (powergrad/transform.py)")
    alpha: float = setting(1.0, "1: the ordinary gradient; the paper uses 0.05-0.3 (0.92 once)", "[0, 1]")
    emulate_fork_fp16: bool = setting(False, "the authors' fp16 hook: p rounded to float16 first "
                                             "(p below ~3e-8 counts as 0)")


@dataclass
class ClipConfig:
    clip_mode: ClipMode = setting("none", "gradient clipping: by norm, by value, or AGC")
    clip_grad: float = setting(0.01, "max norm, max value, or AGC's clip factor", "(0, inf)")
    exclude_head: bool = setting(True, "AGC skips the classifier (timm's train.py, the paper)")


@dataclass
class TrainConfig:
    epochs: int = setting(10, "timm --epochs; the schedule's cool-down comes on top", "[1, inf)")
    global_batch: int | None = setting(
        None, "images per optimizer step over all processes; batch_size is then the largest "
              "micro-batch (null: batch_size x processes x grad_accum_steps)", "[1, inf)")
    batch_size: int = setting(256, "images per process per forward (timm --batch-size)", "[1, inf)")
    eval_batch_size: int = setting(1000, "images per evaluation batch", "[1, inf)")
    grad_accum_steps: int = setting(1, "micro-batches per optimizer step (without global_batch)", "[1, inf)")
    seed: int = setting(0, "weights, data order and augmentation (the rank is added)", "[0, 2147483647]")
    device: DeviceName = setting("auto", "auto: CUDA when present")
    amp_dtype: AmpDtype = setting("float32", "autocast dtype; float16 uses a GradScaler")
    channels_last: bool = setting(False, "NHWC memory format")
    torchcompile: bool = setting(False, "torch.compile the model")
    model_ema: bool = setting(False, "keep and evaluate an EMA of the weights")
    model_ema_decay: float = setting(0.9998, "the EMA's decay per step", "[0, 1]")
    tta_flip: bool = setting(False, "evaluate on the mean of the image's and its mirror's logits")
    threads: int | None = setting(None, "torch CPU threads (null: torch's default)", "[1, inf)",
                                  decides_training=False)
    sync_bn: bool = setting(False, "BatchNorm over all processes' micro-batches (timm --sync-bn)",
                            added_in="2026-12-01")
    # Ten minutes: a job step's tasks usually start within seconds, but container pulls and
    # first imports from a busy shared file system can take minutes (torch's store gives 300 s).
    rendezvous_timeout: float = setting(
        600.0, "seconds every process waits for the others to start before naming the missing "
               "ranks (a busy cluster's tasks can take minutes to start)", "(0, inf)",
        decides_training=False)


@dataclass
class LogConfig:
    output: str = setting("runs", "the run lands in output/experiment", path=True)
    experiment: str | None = setting(None, "the run's folder name (default: the recipe file's name)")
    log_interval: int = setting(50, "optimizer steps between scalar logs", "[1, inf)")
    diagnostics: bool = setting(True, "PGT logit stats, clipping stats (and GPAS probes)")
    filter_collapse: bool = setting(False, "count conv filters below 1 % of their initial norm")
    resume: str = setting("auto", "auto: the run folder's newest readable checkpoint | none | "
                                  "a path", path=True)
    checkpoint: bool = setting(True, "last.pth every epoch and on SIGTERM, best.pth (weights only)")
    checkpoint_every: int = setting(0, "also step-N.pth every N optimizer steps (0: off)", "[0, inf)")
    keep_checkpoints: int = setting(2, "step checkpoints kept, newest first", "[1, inf)")
    lock_stale_after: float = setting(120.0, "seconds without a heartbeat before run.lock is "
                                             "stale, whatever host wrote it", "(0, inf)")


@dataclass
class Recipe:
    description: str = setting("", "one line on what the recipe is for", decides_training=False)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pgt: PGTConfig = field(default_factory=PGTConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = section(LogConfig, decides_training=False)  # how the run is recorded
    paper: dict = setting({}, "the paper's numbers for this row, shown beside measured ones, "
                              "e.g. {source: PGT Table 1, train_top1: 79.68, test_top1: 77.216}",
                          decides_training=False)
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
        return dict(flatten({k: v for k, v in tree.items() if k not in ("paper", "source")}))

    @staticmethod
    def decides_training(key: str) -> bool:
        """Whether a dotted key changes what trains: not for a setting declared (or in a section
        declared) with decides_training=False, such as logging, checkpointing, the run's name
        and folder, CPU threads, the rendezvous timeout and the paper's numbers: a run may
        resume with other values of those."""
        declared = _declared().get(key)
        return declared is None or declared.decides_training

    def digest(self) -> str:
        """A short hash of the settings that decide what trains (Recipe.decides_training).
        Settings added after runs were recorded (setting(added_in=...)) count only when set
        away from their default, so those runs' digests (run folders, the study's records)
        still match."""
        declared = _declared()
        settings = {k: v for k, v in self.flat().items() if self.decides_training(k)
                    and not (k in declared and declared[k].added_at_default(v))}
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()
                              ).hexdigest()[:12]


def flatten(tree: dict, prefix: str = ""):
    """(dotted key, value) of every leaf of a nested dict; free-form mappings stay whole."""
    for key, value in tree.items():
        if isinstance(value, dict) and not is_free_form(f"{prefix}{key}"):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _plain(value):
    """Tuples to lists, so the saved YAML loads back with yaml.safe_load."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def declared_settings(cls=Recipe, prefix: str = ""):
    """(dotted key, dataclass field, type hint) of every setting, sections opened, in
    declaration order."""
    for key, f, hint, _ in _walk(cls, prefix, ()):
        yield key, f, hint


def _walk(cls, prefix: str, sections: tuple):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in ("source", "origins"):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _walk(hints[f.name], f"{prefix}{f.name}.", sections + (f,))
        else:
            yield f"{prefix}{f.name}", f, hints[f.name], sections


@dataclass(frozen=True)
class Declared:
    """What a recipe setting's declaration says beyond its type: read by loading, the digest
    and the run folder's checks, so no table elsewhere restates it."""
    default: object
    path: bool  # a file or folder: `~` and $VARIABLES expanded on loading
    added_in: str | None  # added after runs were recorded: left out of the digest at its default
    decides_training: bool  # false: another value trains the same model
    free_form: bool  # a mapping passed on whole (`dict`), not a section checked key by key

    def added_at_default(self, value) -> bool:
        return self.added_in is not None and value == self.default


@functools.cache
def _declared() -> dict[str, Declared]:
    """Every recipe setting's Declared by dotted key, from its field (and its sections')."""
    return {key: Declared(default=default_of(f), path=f.metadata.get("path", False),
                          added_in=f.metadata.get("added_in"),
                          decides_training=all(s.metadata.get("decides_training", True)
                                               for s in (*sections, f)),
                          free_form=hint is dict or typing.get_origin(hint) is dict)
            for key, f, hint, sections in _walk(Recipe, "", ())}


def declaration(key: str) -> Declared:
    """What the schema declares of a recipe setting, by dotted key (KeyError when none)."""
    return _declared()[key]


def path_settings() -> tuple[str, ...]:
    """The dotted keys of the settings declared with path=True, in declaration order."""
    return tuple(key for key, d in _declared().items() if d.path)


def is_free_form(key: str) -> bool:
    """Whether a dotted key is a free-form mapping (a setting typed `dict`: model.kwargs,
    data.extra, paper), kept whole instead of opened key by key."""
    declared = _declared().get(key)
    return declared is not None and declared.free_form
