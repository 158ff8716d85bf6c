"""timm's training augmentations under timm's train.py names (data.aa, data.reprob, data.remode,
data.recount, data.aug_repeats, data.train_interpolation, data.color_jitter), built from timm's
own pieces for the torchvision loader, in timm's order: RandomResizedCrop -> flip ->
RandAugment/AugMix/AutoAugment (or colour jitter when there is none) -> normalise ->
RandomErasing. data.aa is checked part by part when the recipe loads (config/timm_strings.py).

RandAugment works on PIL images, so a sample goes tensor -> PIL -> tensor around it (only when
data.aa is set). Random erasing fills in normalised space ('pixel': N(0, 1) per value), so it
runs on the normalised batch on the training device, as timm's PrefetchLoader does, for every
image loader. The ffcv and DALI loaders do none of the others: preflight refuses them.
"""
from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from powergrad.config.schema import declaration

# The settings only the torchvision loader honours (they act on samples or on its sampler);
# each is off at its default. Random erasing acts on the normalised batch, so every image
# loader (torchvision, ffcv, DALI) does it; the Fashion-MNIST loader does none of them.
TORCHVISION_ONLY = ("data.aa", "data.aug_repeats", "data.color_jitter", "data.train_interpolation")
IMAGE_LOADERS = ("data.reprob",)
INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR,
                  "bicubic": T.InterpolationMode.BICUBIC}


def settings_in_use(cfg, loader: str) -> list[str]:
    """The augmentation keys `cfg` sets away from off that `loader` cannot do."""
    if loader == "dali":  # timm's RandAugment, the repeats, both filters: dali_augment.py
        from powergrad.data.dali_augment import unsupported_on_dali
        return unsupported_on_dali(cfg)
    refused = () if loader == "torchvision" else TORCHVISION_ONLY
    if loader == "fashion_mnist":
        refused += IMAGE_LOADERS
    return [key for key in refused
            if getattr(cfg, key.split(".")[1]) != declaration(key).default]


def colour_transforms(cfg, res: int) -> list:
    """RandAugment/AugMix/AutoAugment (data.aa, on a PIL image and back), configured as timm's
    create_transform configures them, or colour jitter; [] when neither is set. timm drops
    the jitter under an aa policy unless the policy is one of its '3a' ones."""
    steps = []
    if cfg.aa:
        from powergrad.config.timm_strings import policy_builder, policy_kind

        params = dict(translate_const=int(res * 0.45),
                      img_mean=tuple(min(255, round(255 * m)) for m in cfg.mean),
                      interpolation=_pil_interpolation(cfg.train_interpolation))
        if policy_kind(cfg.aa) == "augmix":
            params["translate_pct"] = 0.3  # timm's create_transform sets it for AugMix only
        policy = zero_bit_posterize_is_black(policy_builder(cfg.aa)(cfg.aa, params))
        steps = [T.ToPILImage(), policy, T.PILToTensor()]
    if cfg.color_jitter and (not cfg.aa or "3a" in cfg.aa):
        steps.append(T.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter))
    return steps


def zero_bit_posterize_is_black(policy):
    """timm's policy with its Posterize ops keeping 0 bits as a black image, as Pillow before
    13 did. Pillow 13 raises for 0 bits, which timm asks for (PosterizeIncreasing at
    magnitude 10, reached by rand-m9-mstd0.5 in about 2 % of draws; Posterize below 2.5):
    the loader then reported a readable image as unreadable and the run stopped."""
    from timm.data import auto_augment

    ops = [*getattr(policy, "ops", []),
           *(op for sub in getattr(policy, "policy", []) for op in sub)]
    for op in ops:
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = _posterize
    return policy


def _posterize(img, bits_to_keep, **kwargs):
    from timm.data import auto_augment

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _pil_interpolation(name: str):
    from PIL import Image
    return {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[name]


def batch_erasing(cfg, device: torch.device):
    """timm's RandomErasing for normalised batches (None when data.reprob is 0)."""
    if not cfg.reprob:
        return None
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(cfg.reprob, mode=cfg.remode, max_count=cfg.recount,
                         device=str(device))


def repeated_sampler(dataset, repeats: int, num_replicas: int, rank: int):
    """timm's RepeatAugSampler (DeiT's repeated augmentation): each image of an epoch's
    selection `repeats` times, the copies spread over the ranks. Its 256-image rounding is
    left out (selected_round=0) so a small data set keeps an epoch: the epoch then holds
    ceil(N / processes) samples per process, DeiT's RASampler up to that rounding."""
    from timm.data.distributed_sampler import RepeatAugSampler

    return RepeatAugSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                            num_repeats=repeats, selected_round=0)


def describe_pipeline(cfg, loader: str) -> str:
    """The training augmentation in one line, for `powergrad describe`."""
    if cfg.dataset == "fashion_mnist":
        return f"random shift by up to {cfg.pad} px, horizontal flip {cfg.hflip:g}"
    steps = [f"RandomResizedCrop(scale {tuple(cfg.scale)}, ratio "
             f"{tuple(round(r, 4) for r in cfg.ratio)}, {cfg.train_interpolation})",
             f"horizontal flip {cfg.hflip:g}"]
    if cfg.aa:
        from powergrad.config.timm_strings import policy_kind

        kind = {"rand": "RandAugment", "augmix": "AugMix"}.get(policy_kind(cfg.aa), "AutoAugment")
        steps.append(f"{kind} {cfg.aa}")
    if cfg.color_jitter and (not cfg.aa or "3a" in cfg.aa):
        steps.append(f"colour jitter {cfg.color_jitter:g}")
    steps.append("normalise")
    if cfg.reprob:
        steps.append(f"RandomErasing(p {cfg.reprob:g}, {cfg.remode}, up to {cfg.recount})")
    line = " -> ".join(steps)
    if cfg.aug_repeats:
        line += f"; repeated augmentation x{cfg.aug_repeats}"
    return f"{line}  (loader: {loader})"

