"""timm's RandAugment (data.aa "rand-...") inside the DALI training pipeline, built from DALI's
automatic augmentation (nvidia.dali.auto_aug): its operations (`augmentations`) and its
per-sample choice of operation (`core.select`, which splits the batch by op).

timm reads the string: `rand_augment_transform(data.aa)` builds timm's own RandAugment, and the
layers (n), magnitude (m), magnitude noise (mstd), its bound (mmax), each layer's probability
(p) and the op list (inc1 picks the "Increasing" variants) are read off that object. Each op
then gets timm's level -> argument formula, tabulated over levels 0.1 apart (0 to mmax); DALI
looks each sample's argument up in that table.

Not `rand_augment.rand_augment()` or `apply_rand_augment()` as they stand: they apply every
chosen op at one magnitude fixed when the pipeline is built, which cannot say timm's per-layer
probability (p 0.5 unless the string sets it) nor its magnitude noise per use (mstd). The layer
loop here is theirs (n ops drawn uniformly with replacement, a sign per layer, `select` per
sample) with an identity drawn with probability 1 - p and the magnitude drawn per sample and
layer. Where the result differs from timm's is listed in README ("DALI's RandAugment").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np

LEVEL_DENOM = 10  # timm's magnitude scale: m9 is 9/10 of each op's range
STEPS = 10  # levels per magnitude unit in DALI's table: timm's noisy magnitudes are continuous


def _enhance(level):  # timm: 0.1 + 1.8 * m/10, the same factor for both signs
    return np.float32(level / LEVEL_DENOM * 1.8 + 0.1)


def _enhance_increasing(level):  # timm: 1 +- 0.9 * m/10 (sign drawn), kept >= 0.1
    return np.float32(max(0.1, 1.0 + level / LEVEL_DENOM * 0.9))


def _sharpness_kernel(factor):
    # PIL's Sharpness blends with its SMOOTH filter: (1 - f) * smooth + f * identity
    smooth = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
    identity = np.zeros((3, 3), np.float32)
    identity[1, 1] = 1
    return ((1 - factor) * smooth + factor * identity).astype(np.float32)


def _poster_mask(bits: int):
    # PIL keeps the `bits` high bits; timm leaves the image alone from 8 bits on
    bits = min(8, max(0, bits))
    return np.uint8(0xFF & ~((1 << (8 - bits)) - 1))


def _solarize(level):
    return min(256, int(level / LEVEL_DENOM * 256))


def _shear(level):
    return level / LEVEL_DENOM * 0.3


def _translate(level):
    return level / LEVEL_DENOM * 0.45  # timm's translate_pct default: a fraction of the side


# timm op name -> (DALI augmentation, sign drawn per use, level -> DALI's argument, describe);
# every op of timm's two uniform RandAugment sets (inc0, inc1), with timm's formulas
OPS = {
    "AutoContrast": ("auto_contrast", False, None, None),
    "Equalize": ("equalize", False, None, None),
    "Invert": ("invert", False, None, None),
    "Rotate": ("rotate", True, lambda lv: np.float32(lv / LEVEL_DENOM * 30),
               lambda lv: f"+-{lv / LEVEL_DENOM * 30:g} deg"),
    "Posterize": ("posterize", False, lambda lv: _poster_mask(int(lv / LEVEL_DENOM * 4)),
                  lambda lv: f"keeps {int(lv / LEVEL_DENOM * 4)} of 8 bits"),
    "PosterizeIncreasing": ("posterize", False,
                            lambda lv: _poster_mask(4 - int(lv / LEVEL_DENOM * 4)),
                            lambda lv: f"keeps {max(0, 4 - int(lv / LEVEL_DENOM * 4))} of 8 bits"),
    "Solarize": ("solarize", False, lambda lv: np.int32(_solarize(lv)),
                 lambda lv: f"inverts from {_solarize(lv)}"),
    "SolarizeIncreasing": ("solarize", False, lambda lv: np.int32(256 - _solarize(lv)),
                           lambda lv: f"inverts from {256 - _solarize(lv)}"),
    "SolarizeAdd": ("solarize_add", False,
                    lambda lv: np.uint8(min(128, int(lv / LEVEL_DENOM * 110))),
                    lambda lv: f"+{min(128, int(lv / LEVEL_DENOM * 110))} below 128"),
    "ShearX": ("shear_x", True, lambda lv: np.float32([_shear(lv), 0]),
               lambda lv: f"+-{_shear(lv):.3g}"),
    "ShearY": ("shear_y", True, lambda lv: np.float32([0, _shear(lv)]),
               lambda lv: f"+-{_shear(lv):.3g}"),
    "TranslateXRel": ("translate_x", True, lambda lv: np.float32([_translate(lv), 0]),
                      lambda lv: f"+-{_translate(lv):.3g} of the width"),
    "TranslateYRel": ("translate_y", True, lambda lv: np.float32([0, _translate(lv)]),
                      lambda lv: f"+-{_translate(lv):.3g} of the height"),
}
for _name, _dali in (("Color", "color"), ("Contrast", "contrast"), ("Brightness", "brightness")):
    OPS[_name] = (_dali, False, _enhance, lambda lv: f"x{_enhance(lv):.3g}")
    OPS[_name + "Increasing"] = (_dali, True, _enhance_increasing,
                                 lambda lv: f"x1+-{lv / LEVEL_DENOM * 0.9:.3g}")
OPS["Sharpness"] = ("sharpness", False, lambda lv: _sharpness_kernel(_enhance(lv)),
                    lambda lv: f"x{_enhance(lv):.3g}")
OPS["SharpnessIncreasing"] = ("sharpness", True,
                              lambda lv: _sharpness_kernel(_enhance_increasing(lv)),
                              lambda lv: f"x1+-{lv / LEVEL_DENOM * 0.9:.3g}")


class NotOnDali(ValueError):
    """A policy timm reads that this DALI RandAugment does not do."""


@dataclass(frozen=True)
class RandAugmentSpec:
    """timm's RandAugment as its own object holds it."""
    ops: tuple[str, ...]  # timm's op names, in timm's order
    n: int  # layers: ops applied one after another
    m: float  # magnitude, of LEVEL_DENOM
    mstd: float  # per-use noise on m: 0 none, inf uniform in [0, m]
    mmax: float  # the magnitude is clamped to [0, mmax]
    p: float  # each layer acts with this probability

    def levels(self) -> np.ndarray:
        """The magnitudes DALI's tables hold, 0.1 apart: bin b is level b / STEPS."""
        return np.arange(round(self.mmax * STEPS) + 1) / STEPS


def rand_augment_spec(aa: str) -> RandAugmentSpec:
    """data.aa as timm reads it (timm's errors pass through); NotOnDali for what timm reads
    but this pipeline does not do."""
    from timm.data.auto_augment import rand_augment_transform

    if not aa.startswith("rand"):
        raise NotOnDali(f"data.aa {aa!r}: DALI here does timm's RandAugment ('rand-...') only; "
                        "AutoAugment and AugMix need data.loader: torchvision")
    ra = rand_augment_transform(aa, None)
    unknown = [op.name for op in ra.ops if op.name not in OPS]
    if ra.choice_weights is not None or unknown:
        raise NotOnDali(f"data.aa {aa!r}: its op set ({', '.join(unknown) or 'weighted'}) is "
                        "not one DALI here does (timm's uniform sets, inc0 and inc1); use "
                        "data.loader: torchvision")
    op = ra.ops[0]  # every op of timm's RandAugment holds the same settings
    return RandAugmentSpec(tuple(o.name for o in ra.ops), ra.num_layers, float(op.magnitude),
                           float(op.magnitude_std), float(op.magnitude_max or LEVEL_DENOM),
                           float(op.prob))


def unsupported_on_dali(cfg) -> list[str]:
    """The augmentation keys `cfg` sets that the DALI loader cannot do (a data.aa timm cannot
    read at all is left to the parse check, which names timm's error)."""
    keys = []
    if cfg.aa:
        try:
            rand_augment_spec(cfg.aa)
        except NotOnDali:
            keys.append("data.aa")
        except (AssertionError, KeyError, ValueError, IndexError):
            pass
    if cfg.color_jitter:
        keys.append("data.color_jitter")
    return keys


def fill_value(mean) -> int:
    """DALI fills with one value for all channels: the mean of timm's per-channel fill (the
    data mean in 0-255, as augment.colour_transforms gives timm)."""
    return round(sum(min(255, round(255 * m)) for m in mean) / len(mean))


def dali_op(name: str):
    """DALI's function for timm's op `name`: its auto_aug augmentation's own op (undecorated:
    the argument comes from param_table). DALI 2.4's equalize and sharpness call the
    fn.experimental aliases, which print a deprecation warning at every pipeline build (DALI
    forces the warning on), so those two call fn.equalize / fn.filter, the same operators."""
    from nvidia.dali import fn
    from nvidia.dali.auto_aug import augmentations

    dali_name = OPS[name][0]
    if dali_name == "equalize":
        return lambda data, _: fn.equalize(data)
    if dali_name == "sharpness":
        return lambda data, kernel: fn.filter(data, kernel)
    return getattr(augmentations, dali_name).op


def param_device(name: str) -> str:
    """Where DALI's op wants its argument: "auto" (the images' device) for the arguments it
    computes with (posterize, solarize, sharpness), else the CPU (named arguments)."""
    from nvidia.dali.auto_aug import augmentations

    return getattr(augmentations, OPS[name][0]).param_device


def param_table(name: str, spec: RandAugmentSpec):
    """timm's argument for op `name` at every level of spec.levels() and sign: row 2 b + s is
    level b / STEPS, negated when s is 1 (an op without a sign repeats the row); None for an
    op without an argument."""
    _, negate, to_param, _ = OPS[name]
    if to_param is None:
        return None
    rows = []
    for level in spec.levels():
        rows += [to_param(level), to_param(-level if negate else level)]
    return np.stack([np.asarray(row) for row in rows])


def _identity(images):
    return images


def apply_op(name: str, images, param, *, shape: tuple[int, int], fill: int):
    """DALI's op for timm's `name` on uint8 HWC images of `shape` (height, width) with argument
    `param`: geometric ops bilinear (DALI's warps have no bicubic), filled with `fill`."""
    import inspect

    from nvidia.dali import types

    op = dali_op(name)
    accepted = inspect.signature(op).parameters
    extra = {key: value for key, value in (("shape", shape), ("fill_value", fill),
                                           ("interp_type", types.INTERP_LINEAR))
             if key in accepted}
    return op(images, param, **extra)


def _magnitude_bins(spec: RandAugmentSpec):
    """The magnitude bin of every layer: one int when fixed, else per sample and layer."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dali_math

    if spec.mstd == 0 or (math.isinf(spec.mstd) and spec.m <= 0):
        return round(min(max(spec.m, 0.0), spec.mmax) * STEPS)
    if math.isinf(spec.mstd):  # timm: mstd over 100 means uniform in [0, m]
        level = fn.random.uniform(range=[0.0, spec.m], shape=(spec.n,))
    else:
        level = fn.random.normal(mean=spec.m, stddev=spec.mstd, shape=(spec.n,))
    level = dali_math.clamp(level, 0.0, spec.mmax)
    return fn.cast(level * STEPS, dtype=types.INT32)  # DALI's cast rounds to nearest


def rand_augment(images, spec: RandAugmentSpec, *, size: int, fill: int):
    """timm's RandAugment on DALI uint8 HWC images of size x size; the pipeline needs
    enable_conditionals=True (`select` splits the batch by op)."""
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug.core import select
    from nvidia.dali.pipeline import do_not_convert

    if spec.n == 0 or spec.p == 0:
        return images
    # Tables and ops in plain Python: with conditionals on, DALI rewrites (autograph) every
    # function the pipeline calls, which took half a minute for the tables' loops and
    # seconds for each op; only `select` has to be rewritten (its `if` splits the batch).
    tables = {name: do_not_convert(param_table)(name, spec) for name in spec.ops}
    k = len(spec.ops)
    weights = [spec.p / k] * k
    if spec.p < 1:  # the layer does nothing with probability 1 - p, as timm's AugmentOp
        weights = [1 - spec.p] + weights
    chosen = fn.random.choice(len(weights), p=weights, shape=(spec.n,))
    sign = fn.random.uniform(values=[0, 1], dtype=types.INT32, shape=(spec.n,))
    rows = _magnitude_bins(spec) * 2 + sign  # the row of param_table, per layer
    for layer in range(spec.n):
        # every argument before the split: DALI splits them with the batch
        params = {name: None if table is None else types.Constant(
            table, device=images.device if param_device(name) == "auto" else "cpu")[rows[layer]]
            for name, table in tables.items()}
        ops = [do_not_convert(partial(apply_op, name, param=params[name], shape=(size, size),
                                      fill=fill)) for name in spec.ops]
        if spec.p < 1:
            ops = [do_not_convert(_identity)] + ops
        images = select(ops, chosen[layer], images)
    return images


def describe_dali_pipeline(cfg, mixing: str = "") -> str:
    """The DALI training pipeline for `powergrad describe`: one line (then `mixing`), and the
    RandAugment ops with their ranges at m on the next."""
    steps = [f"decode a random crop (scale {tuple(cfg.scale)}, ratio "
             f"{tuple(round(r, 4) for r in cfg.ratio)})",
             f"resize ({cfg.train_interpolation}, antialiased)",
             f"horizontal flip {cfg.hflip:g}"]
    details = []
    if cfg.aa:
        try:
            spec = rand_augment_spec(cfg.aa)
        except NotOnDali as err:
            steps.append(f"refused: {err}")
        except (AssertionError, KeyError, ValueError, IndexError) as err:
            steps.append(f"refused: timm cannot parse data.aa {cfg.aa!r} ({err})")
        else:
            level = min(max(spec.m, 0.0), spec.mmax)
            noise = ("none" if spec.mstd == 0 else "uniform in [0, m]" if math.isinf(spec.mstd)
                     else f"N(0, {spec.mstd:g})")
            steps.append(f"RandAugment {cfg.aa} (DALI auto_aug: {spec.n} layers, each p "
                         f"{spec.p:g}, m {spec.m:g} of {LEVEL_DENOM}, noise {noise}, clamped "
                         f"to [0, {spec.mmax:g}] in steps of {1 / STEPS:g}; geometric ops "
                         f"bilinear, fill {fill_value(cfg.mean)})")
            details.append(f"  RandAugment ops at m {level:g}, one drawn uniformly per layer: "
                           + ", ".join(name if OPS[name][3] is None
                                       else f"{name} {OPS[name][3](level)}"
                                       for name in spec.ops))
    steps.append("normalise")
    if cfg.reprob:
        steps.append(f"RandomErasing(p {cfg.reprob:g}, {cfg.remode}, up to {cfg.recount}, "
                     "on the batch)")
    line = " -> ".join(steps)
    if cfg.aug_repeats:
        line += f"; repeated augmentation x{cfg.aug_repeats} (timm's RepeatAugSampler order)"
    return "\n".join([f"{line}  (loader: dali){mixing}"] + details)
