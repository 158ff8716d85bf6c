"""Preflight's data checks: the data a recipe names is there, with the classes and channels
the model expects, read as cheaply as can be (IDX headers, .beton headers and sidecars,
ImageFolder listings: names only; `powergrad check-data` opens every image)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from powergrad.config.loading import fail_on
from powergrad.config.schema import Recipe
from powergrad.errors import one_line


@dataclass(frozen=True)
class DataFacts:
    """What the data holds, read without loading it."""
    where: str  # the data as a reader of the message knows it
    num_classes: int
    channels: int
    train_images: int  # after data.train_subset
    train_images_all: int  # before data.train_subset


def inspect_data(recipe: Recipe) -> DataFacts:
    """Find the data, check it is readable, and count it (ImageFolder trees are listed whole:
    a few seconds for ImageNet's 1.3 M files, and every stray file is found now)."""
    if recipe.data.dataset == "fashion_mnist":
        facts = _fashion_mnist_facts(recipe)
    else:
        facts = _image_facts(recipe)
    subset = recipe.data.train_subset
    if subset is not None and subset < facts.train_images:
        facts = DataFacts(facts.where, facts.num_classes, facts.channels, subset,
                          facts.train_images_all)
    return facts


def _fashion_mnist_facts(recipe: Recipe) -> DataFacts:
    from powergrad.data.fashion_mnist import CLASS_NAMES, split_size

    check_augmentation(recipe, "fashion_mnist")
    root = recipe.data.root
    try:
        train_images = split_size(root, "train")
        test_images = split_size(root, "test")
    except (OSError, EOFError, ValueError) as err:  # missing, not gzip, cut short, bad header
        fail_on(recipe, "data.root", f"got {root!r}: {one_line(err)}")
    if not train_images or not test_images:
        fail_on(recipe, "data.root", f"got {root!r}: {train_images} train and {test_images} "
                                   "test images; expected both splits to hold images")
    return DataFacts(f"Fashion-MNIST at {root}", len(CLASS_NAMES), 1, train_images, train_images)


def _image_facts(recipe: Recipe) -> DataFacts:
    from powergrad.data.imagefolder_checks import ImageDataError
    from powergrad.data.images import choose_loader

    data_cfg = recipe.data
    try:
        with warnings.catch_warnings():  # the loader repeats its own fallback warning
            warnings.simplefilter("ignore")
            backend = choose_loader(data_cfg)
    except (ValueError, ImportError) as err:
        fail_on(recipe, "data.loader", f"got {data_cfg.loader!r}: {one_line(err)}")
    check_augmentation(recipe, backend)
    if backend == "dali" and data_cfg.bad_images == "skip":
        fail_on(recipe, "data.bad_images", "got 'skip', but DALI decodes inside its pipeline and "
                                         "cannot skip a file; expected error with data.loader "
                                         "dali (`powergrad check-data` lists bad files first)")
    if backend == "ffcv":
        from powergrad.data.beton_meta import read_beton_info

        infos = []
        for key in ("data.train_beton", "data.val_beton"):
            try:
                infos.append(read_beton_info(getattr(data_cfg, key.split(".")[1]),
                                             data_cfg.num_classes))
            except ImageDataError as err:
                fail_on(recipe, key, one_line(err))
        train, val = infos
        _check_same_classes(recipe, "data.val_beton", train.class_names, val.class_names)
        return DataFacts(f".beton {data_cfg.train_beton}", train.num_classes, 3,
                         train.num_samples, train.num_samples)
    train_classes, train_count = _scan_folder(recipe, "data.train_dir")
    val_classes, _ = _scan_folder(recipe, "data.val_dir")
    _check_same_classes(recipe, "data.val_dir", train_classes, val_classes)
    return DataFacts(f"ImageFolder {data_cfg.train_dir}", len(train_classes), 3, train_count,
                     train_count)


def check_augmentation(recipe: Recipe, loader: str) -> None:
    """timm's augmentation keys are the torchvision loader's: another loader refuses them
    (one line naming the loader that can), and data.aa must be a policy timm parses."""
    from powergrad.data.augment import colour_transforms, settings_in_use

    used = settings_in_use(recipe.data, loader)
    if used:
        key = used[0]
        fail_on(recipe, key, f"got {getattr(recipe.data, key.split('.')[1])!r}, but the {loader} "
                           "loader does not do it; expected data.loader: torchvision (the "
                           "loader with timm's augmentations) or the key left unset")
    if recipe.data.aa:
        try:
            colour_transforms(recipe.data, recipe.data.img_size)
        except (AssertionError, KeyError, ValueError, IndexError) as err:
            fail_on(recipe, "data.aa", f"got {recipe.data.aa!r}: timm cannot parse it "
                                     f"({type(err).__name__}: {one_line(err)}); expected a "
                                     "policy such as rand-m9-mstd0.5-inc1 or original")


def _scan_folder(recipe: Recipe, key: str) -> tuple[list[str], int]:
    """(class names, image count) of the ImageFolder tree `key` names, listed as the loader
    will list it; a missing tree, a class folder without images or a file that is not an
    image fails here (every such file counted in the message), not hours into an epoch."""
    from powergrad.data.imagefolder_checks import ImageDataError, scan_image_folder

    root = getattr(recipe.data, key.split(".")[1])
    tree = f"expected an ImageFolder tree ({root}/<class>/<image>)"
    if not Path(root).is_dir():
        fail_on(recipe, key, f"got {root!r}: no such directory; {tree}")
    problems: list[str] = []
    try:
        classes, samples = scan_image_folder(root, problems=problems)
    except (ImageDataError, OSError) as err:  # no class folders; an unreadable folder
        fail_on(recipe, key, f"got {root!r}: {one_line(err)}; {tree}")
    if problems:
        more = f" (and {len(problems) - 1} more: `powergrad check-data {root}` lists them)" \
            if len(problems) > 1 else ""
        fail_on(recipe, key, f"got {root!r}: {problems[0]}{more}")
    return classes, len(samples)


def _check_same_classes(recipe: Recipe, val_key: str, train_classes: list[str],
                        val_classes: list[str]) -> None:
    if train_classes != val_classes:
        differ = sorted(set(train_classes) ^ set(val_classes))[:5]
        fail_on(recipe, val_key, f"got {getattr(recipe.data, val_key.split('.')[1])!r} with "
                               f"{len(val_classes)} classes; expected the same classes as the "
                               f"training data's {len(train_classes)} (differing: {differ})")


def check_data_matches_model(recipe: Recipe, data: DataFacts) -> None:
    if recipe.model.num_classes != data.num_classes:
        fail_on(recipe, "model.num_classes", f"got {recipe.model.num_classes}, but {data.where} "
                                           f"has {data.num_classes} classes; expected "
                                           f"{data.num_classes}")
    if recipe.data.num_classes is not None and recipe.data.num_classes != data.num_classes:
        fail_on(recipe, "data.num_classes", f"got {recipe.data.num_classes}, but {data.where} "
                                          f"has {data.num_classes} classes")
    if recipe.model.in_chans != data.channels:
        fail_on(recipe, "model.in_chans", f"got {recipe.model.in_chans}, but {data.where} has "
                                        f"{data.channels}-channel images; expected "
                                        f"{data.channels}")


def image_sizes(recipe: Recipe) -> dict[str, int]:
    """The square image sizes the model will see, by the key that sets each."""
    data = recipe.data
    if data.dataset == "fashion_mnist":
        return {"data.dataset": 28}  # the loader's own 28 x 28
    sizes = {"data.img_size": data.img_size} if data.min_res is None else \
        {"data.min_res": data.min_res, "data.max_res": data.max_res}
    sizes["data.val_img_size" if data.val_img_size else "data.img_size"] = \
        data.val_img_size or data.img_size
    return sizes
