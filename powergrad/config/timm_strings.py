"""The recipe's strings that timm parses itself: data.aa (RandAugment, AugMix and AutoAugment
policies), optim.opt and sched.decay_fn, checked part by part before any work; and the one
schedule length timm checks only when it builds the schedule (wsd's decay phase).

timm's parsers pass over what they do not know: an aa part holding no digit (`zz`), a
RandAugment transform set other than its three (`tfoo`), an optimizer prefix other than
`lookahead_`; and they clamp a magnitude to their range at every call (`m99` trains as
`m10`). The user meant something and would get something else without a word, so here each
part must be one timm reads, its value in timm's range, and the whole string is then built
with timm's own function (whatever it refuses is refused too).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable

# Each kind's parts: the letters before the number (timm splits a part at its first digit)
# -> (what it sets, the number's type, its allowed interval as the schema writes intervals).
# RandAugment's magnitude bound is mmax when given, else timm's level scale (10).
RAND_PARTS = {"m": ("magnitude", int, "[0, mmax]"), "n": ("ops per image", int, "[1, inf)"),
              "p": ("probability of each op", float, "[0, 1]"),
              "mstd": ("magnitude noise std; over 100: uniform", float, "[0, inf)"),
              "mmax": ("magnitude upper bound", int, "[1, inf)"),
              "inc": ("increasing-severity switch", int, "[0, 1]")}
RAND_TRANSFORM_SETS = ("weights", "3aw", "3a")  # the t part: timm's rand_augment_choices
AUGMIX_PARTS = {"m": ("severity", int, "[0, 10]"), "w": ("chain width", int, "[1, inf)"),
                "d": ("chain depth; 0: 1 to 3 at random", int, "[0, inf)"),
                "a": ("mixing alpha", float, "(0, inf)"),
                "b": ("blend switch", int, "[0, 1]"),
                "mstd": ("magnitude noise std", float, "[0, inf)")}
AUTO_PARTS = {"mstd": ("magnitude noise std", float, "[0, inf)")}
AUTO_POLICIES = ("original", "originalr", "v0", "v0r", "3a")  # timm's auto_augment_policy
EXAMPLES = "rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original or v0"


class TimmStringError(ValueError):
    """A string timm would misread: `key` is the recipe key, the message names the part."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


def policy_kind(aa: str) -> str:
    """'rand', 'augmix' or 'auto': which timm factory builds the policy (by its first part)."""
    head = aa.split("-")[0]
    return head if head in ("rand", "augmix") else "auto"


def policy_builder(aa: str) -> Callable:
    """timm's own factory for `aa`: rand_augment_transform, augment_and_mix_transform or
    auto_augment_transform, each called as (config string, hparams)."""
    from timm.data import auto_augment as timm_aa

    return {"rand": timm_aa.rand_augment_transform,
            "augmix": timm_aa.augment_and_mix_transform,
            "auto": timm_aa.auto_augment_transform}[policy_kind(aa)]


def policy_parts(aa: str) -> dict[str, float | str]:
    """The settings an aa string gives, by part name ({'m': 9, 'mstd': 0.5, 'inc': 1}; a
    RandAugment transform set as {'t': 'weights'}), each checked: TimmStringError otherwise.
    A loader that does the augmentation itself (not through timm) reads them from here."""
    kind = policy_kind(aa)
    head, *parts = aa.split("-")
    if kind == "auto" and head not in AUTO_POLICIES:
        raise TimmStringError("data.aa", f"got {aa!r}: {head!r} is not a policy timm knows; "
                                         f"expected rand-..., augmix-... or one of the "
                                         f"AutoAugment policies {', '.join(AUTO_POLICIES)} "
                                         f"(e.g. {EXAMPLES})")
    known = {"rand": RAND_PARTS, "augmix": AUGMIX_PARTS, "auto": AUTO_PARTS}[kind]
    name = {"rand": "RandAugment", "augmix": "AugMix", "auto": f"AutoAugment {head}"}[kind]
    found: dict[str, float | str] = {}
    for part in parts:
        def refuse(why: str):
            raise TimmStringError("data.aa", f"got {aa!r}: part {part!r} {why}")
        key, value = _split_part(part, kind)
        if key not in known and key != "t":
            listed = f"{', '.join(known)} (each with its number)"
            if kind == "rand":
                listed += ", or t" + "/t".join(RAND_TRANSFORM_SETS)
            what = "holds no number, so timm would skip it" if value is None else \
                f"is not one of {name}'s settings"
            refuse(f"{what}; expected parts {listed}")
        if key in found:
            refuse(f"sets {key} a second time; expected each part once")
        if key == "t":
            if value not in RAND_TRANSFORM_SETS:
                refuse(f"names no transform set timm knows (it would use its default set); "
                       f"expected {', '.join('t' + s for s in RAND_TRANSFORM_SETS)}")
            found[key] = value
            continue
        meaning, kind_of, _ = known[key]
        try:
            number = kind_of(value)
        except ValueError:
            refuse(f"({meaning}) is not {'a whole number' if kind_of is int else 'a number'}")
        if not math.isfinite(number):
            refuse(f"({meaning}) is not a finite number")
        found[key] = number
    for key in sorted(found, key=lambda k: k == "m"):  # m last: its bound is mmax's
        number = found[key]
        if key == "t":
            continue
        meaning, _, interval = known[key]
        if key == "m":  # timm clamps it at every call: to mmax, else to its level scale (10)
            interval = f"[0, {found.get('mmax', _level_scale())}]"
        if not _in(number, interval):
            part = next(p for p in parts if _split_part(p, kind)[0] == key)
            bound = " (mmax raises the bound: e.g. rand-m15-mmax20)" if key == "m" and \
                kind == "rand" and "mmax" not in found else ""
            raise TimmStringError("data.aa", f"got {aa!r}: part {part!r} ({meaning}) is "
                                             f"outside timm's range {interval}{bound}")
    return found


def check_policy(aa: str) -> None:
    """TimmStringError unless every part of `aa` is one timm reads, in its range, and timm's
    own factory builds it."""
    policy_parts(aa)
    try:
        policy_builder(aa)(aa, None)
    except Exception as err:  # timm asserts or raises many types for what it refuses
        raise TimmStringError("data.aa", f"got {aa!r}: timm cannot build it "
                                         f"({type(err).__name__}: {' '.join(str(err).split())}"
                                         f"); expected e.g. {EXAMPLES}") from None


def check_optimizer_name(opt: str) -> None:
    """timm reads optim.opt as [lookahead_]NAME, takes the part after the last '_' and passes
    over the others: each must mean something."""
    import timm.optim

    *prefixes, name = opt.lower().split("_")
    names = timm.optim.list_optimizers()
    if name not in names:
        import difflib

        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TimmStringError("optim.opt", f"got {opt!r}: {name!r} is not a timm optimizer "
                                           f"(timm.optim.list_optimizers()){hint}")
    if prefixes and prefixes != ["lookahead"]:
        raise TimmStringError("optim.opt", f"got {opt!r}: timm reads only the prefix "
                                           f"lookahead_ and would pass over "
                                           f"{'_'.join(p for p in prefixes if p != 'lookahead')!r}"
                                           f"; expected {name!r} or 'lookahead_{name}'")


def check_decay_fn(decay_fn: str) -> None:
    """sched.decay_fn is one of timm's WSD decay shapes."""
    from timm.scheduler import wsd_lr

    shapes = getattr(wsd_lr, "_DECAY_FNS", ("linear", "1-sqrt", "cosine", "power", "exp"))
    if decay_fn not in shapes:
        raise TimmStringError("sched.decay_fn", f"got {decay_fn!r}, expected one of "
                                                f"{', '.join(shapes)} (timm's WSD decay shapes)")


def check_wsd_lengths(sched, epochs: int) -> None:
    """timm's wsd schedule fits its stable and decay phases after the warm-up, in train.epochs:
    create_scheduler_v2 refuses a decay_epochs over epochs - warmup_epochs (one below 1 is a
    fraction of that span) when the run builds its schedule; here it is refused on load."""
    if sched.sched != "wsd":
        return
    span = epochs - sched.warmup_epochs
    if span <= 0:
        raise TimmStringError("sched.warmup_epochs", f"got {sched.warmup_epochs:g} with "
                                                     f"train.epochs {epochs}: timm's wsd "
                                                     f"schedule needs epochs after the warm-up; "
                                                     f"expected a value below {epochs}")
    if 1 <= sched.decay_epochs and sched.decay_epochs > span:
        raise TimmStringError("sched.decay_epochs", f"got {sched.decay_epochs:g} with sched wsd, "
                                                    f"whose decay timm fits in train.epochs - "
                                                    f"sched.warmup_epochs = {span:g} epochs; "
                                                    f"expected a value in (0, {span:g}] (below "
                                                    f"1: a fraction of those epochs)")


def check_timm_strings(recipe) -> None:
    """Every timm-parsed string of a loaded recipe (loading.py calls it with the others), and
    the wsd schedule's lengths."""
    if recipe.data.aa:
        check_policy(recipe.data.aa)
    check_optimizer_name(recipe.optim.opt)
    check_decay_fn(recipe.sched.decay_fn)
    check_wsd_lengths(recipe.sched, recipe.train.epochs)


def _split_part(part: str, kind: str) -> tuple[str, str | None]:
    """(letters, number text or None) as timm splits a part: at its first digit; a
    RandAugment part starting with 't' names a transform set."""
    if kind == "rand" and part.startswith("t"):
        return "t", part[1:]
    pieces = re.split(r"(\d.*)", part)
    return (pieces[0], pieces[1]) if len(pieces) > 1 else (part, None)


def _level_scale() -> int:
    """timm's magnitude scale: the level its ops reach their strongest at (10)."""
    from timm.data import auto_augment as timm_aa

    return int(getattr(timm_aa, "_LEVEL_DENOM", 10))


def _in(value: float, interval: str) -> bool:
    from powergrad.config.schema import in_interval

    return in_interval(value, interval)
