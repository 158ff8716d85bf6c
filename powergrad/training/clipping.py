"""Gradient clipping through timm's dispatch_clip_grad, plus the numbers worth logging:
the global gradient norm before and after, and for AGC the fraction of units it clipped."""
from __future__ import annotations

import torch
from timm.utils import dispatch_clip_grad
from timm.utils.agc import unitwise_norm


def clip_parameters(model: torch.nn.Module, mode: str, exclude_head: bool) -> list[torch.Tensor]:
    """The parameters to clip: all, or without the classifier for AGC. Like timm's train.py,
    'the classifier' is the model's last two parameters (weight and bias of the head)."""
    params = list(model.parameters())
    return params[:-2] if mode == "agc" and exclude_head else params


def global_grad_norm(params: list[torch.Tensor]) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0


@torch.no_grad()
def agc_clipped_fraction(params: list[torch.Tensor], clip_factor: float, eps: float = 1e-3) -> float:
    """Fraction of parameter elements whose unit (output row) AGC is about to rescale: those
    where ||g_unit|| > clip_factor * max(||w_unit||, eps), the rule timm's adaptive_clip_grad uses."""
    clipped = total = 0.0
    for p in params:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p.detach()).clamp_(min=eps).mul_(clip_factor)
        hit = unitwise_norm(p.grad.detach()) > max_norm
        clipped += hit.expand_as(p).sum().item() if hit.dim() else hit.item() * p.numel()
        total += p.numel()
    return clipped / total if total else 0.0


def clip_gradients(params: list[torch.Tensor], mode: str, value: float,
                   measure: bool = False) -> dict[str, float]:
    """Clip in place (mode none|norm|value|agc); with `measure`, return norms for logging."""
    stats = {}
    if measure:
        stats["clip/grad_norm_before"] = global_grad_norm(params)
        if mode == "agc":
            stats["clip/agc_clipped_frac"] = agc_clipped_fraction(params, value)
    if mode != "none":
        dispatch_clip_grad(params, value, mode=mode)
    if measure:  # without clipping the norm is unchanged: no second pass over the gradients
        stats["clip/grad_norm_after"] = (stats["clip/grad_norm_before"] if mode == "none"
                                         else global_grad_norm(params))
    return stats
