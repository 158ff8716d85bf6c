"""timm model creation with the suite's options: BN-free ResNets, a small-image stem,
ffcv-imagenet's BlurPool, GPAS."""
from __future__ import annotations

import timm
import torch.nn as nn
from timm.layers import BlurPool2d

from powergrad.config.schema import ModelConfig


def build_model(cfg: ModelConfig, pretrained: bool = False) -> nn.Module:
    """The recipe's network; pretrained=True starts it from timm's released weights when
    cfg.pretrained asks for them (read from the local cache: finetune.cached_pretrained_file;
    the run's own initial_checkpoint is loaded by the engine, after the suite's layers)."""
    kwargs = dict(cfg.kwargs)
    if pretrained and cfg.pretrained:
        from powergrad.training.finetune import cached_pretrained_file
        from powergrad.training.weights import WeightsError

        file = cached_pretrained_file(cfg.model)
        if file is None:
            raise WeightsError(f"model.pretrained: timm's weights for {cfg.model} are not in "
                               "the Hugging Face cache")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": file})
    if cfg.norm == "none":
        # The PGT paper's BN-free network. norm_layer=None would silently give BatchNorm back.
        kwargs["norm_layer"] = nn.Identity
    kwargs.setdefault("pretrained", False)
    model = timm.create_model(cfg.model, num_classes=cfg.num_classes,
                              in_chans=cfg.in_chans, drop_rate=cfg.drop_rate,
                              drop_path_rate=cfg.drop_path, **kwargs)
    if cfg.stem == "small":
        _use_small_stem(model, cfg.in_chans, cfg.stem_stride)
    if cfg.blurpool:
        _blur_strided_convs(model)
    if cfg.gpas.enabled or cfg.gpas.variant != "pre":
        from powergrad.gpas import apply_gpas
        g = cfg.gpas
        apply_gpas(model, variant=g.variant, gate=g.gate if g.enabled else None,
                   learnable=g.learnable, init=g.init, stop_gradient=g.stop_gradient,
                   deepnorm_scaled_init=g.deepnorm_scaled_init)
    return model


def _use_small_stem(model: nn.Module, in_chans: int, stride: int) -> None:
    """Replace a timm ResNet's 7x7/2 conv + max-pool stem by one 3x3 conv, for 28-64 px
    inputs (the usual CIFAR adaptation); at stride 1 the first stage sees the full image."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(f"stem: small needs a timm ResNet with the default stem, "
                         f"got {type(model).__name__}")
    model.conv1 = nn.Conv2d(in_chans, conv.out_channels, 3, stride=stride, padding=1, bias=False)
    model.maxpool = nn.Identity()


def _blur_strided_convs(model: nn.Module) -> None:
    """ffcv-imagenet's BlurPool: blur (stride 1, zero padding) then the original strided conv,
    for every conv with stride > 1 and at least 16 input channels (the stem's is left alone)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.Conv2d) and max(child.stride) > 1
                    and child.in_channels >= 16):
                blur = BlurPool2d(child.in_channels, filt_size=3, stride=1, pad_mode="constant")
                setattr(parent, name, nn.Sequential(blur, child))
