"""The PowerGrad Transform (PGT), from "Altering Backward Pass Gradients improves Convergence"
(Das et al., arXiv 2111.12495).

Cross-entropy's gradient at the logits z is p - q with p = softmax(z) and q the target
distribution. PGT trains on p' - q instead, where p'_i = p_i^alpha / sum_j p_j^alpha, which is
the same thing as softmax(alpha * z). The forward value stays the ordinary cross-entropy, so
logged losses remain comparable with a baseline.

Exactness: p' is computed from the logits in the backward pass. The authors' public hook instead
rebuilds p from the incoming gradient assuming a loss scale of N^2, which is only right at one
batch size and loss scale. Here the upstream gradient (loss scale, accumulation factor, mean
over the batch) simply multiplies (p' - q) / N, as it would for ordinary cross-entropy.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["powergrad_probs", "PowerGradCrossEntropy", "wrap_loss", "logit_stats"]


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"PGT alpha must lie in [0, 1] (1 = ordinary gradient), got {alpha}")
    return alpha


def powergrad_probs(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """p' = p^alpha / sum(p^alpha) = softmax(alpha * z), in at least float32."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.softmax(check_alpha(alpha) * z, dim=-1)


def _subtract_target(p_alpha: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """p' - q in place, q = (1 - eps) * t + eps / C with t one-hot or soft (torch's definition)."""
    if smoothing > 0.0:
        p_alpha.sub_(smoothing / p_alpha.shape[-1])
    if target.is_floating_point():  # class probabilities, e.g. from timm's Mixup/CutMix
        return p_alpha.sub_(target.to(p_alpha.dtype), alpha=1.0 - smoothing)
    rows = torch.arange(target.shape[0], device=target.device)
    p_alpha[rows, target] -= 1.0 - smoothing
    return p_alpha


class _PowerGradCE(torch.autograd.Function):
    """Value: F.cross_entropy. Gradient at the logits: grad_out * (softmax(alpha*z) - q) / N."""

    @staticmethod
    def forward(ctx, logits, target, alpha, smoothing):
        ctx.save_for_backward(logits, target)
        ctx.alpha, ctx.smoothing = alpha, smoothing
        return _cross_entropy(logits, target, smoothing)

    @staticmethod
    def backward(ctx, grad_out):
        logits, target = ctx.saved_tensors
        grad = _subtract_target(powergrad_probs(logits, ctx.alpha), target, ctx.smoothing)
        grad.mul_(grad_out / logits.shape[0])
        return grad.to(logits.dtype), None, None, None


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """The ordinary mean cross-entropy, computed in at least float32 (as autocast does)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if target.is_floating_point():
        target = target.to(z.dtype)
    return F.cross_entropy(z, target, label_smoothing=smoothing)


class PowerGradCrossEntropy(nn.Module):
    """Cross-entropy whose logit gradient is the PGT one.

    Targets: class indices [N] or class probabilities [N, C] (timm's Mixup/CutMix). Label
    smoothing eps applies to both as in F.cross_entropy: q = (1 - eps) t + eps / C (for indices
    this is timm's LabelSmoothingCrossEntropy; timm's train.py instead smooths inside Mixup and
    uses SoftTargetCrossEntropy, which wrap_loss maps to eps = 0, so nothing is smoothed twice).
    Reduction is the mean over the batch. Without autograd (eval, torch.no_grad) it is plain
    cross-entropy. alpha = 1 gives exactly the ordinary gradient.
    """

    def __init__(self, alpha: float, smoothing: float = 0.0):
        super().__init__()
        self.alpha = check_alpha(alpha)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing must lie in [0, 1), got {smoothing}")
        self.smoothing = float(smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2:
            raise ValueError(f"expected logits of shape [N, C], got {tuple(logits.shape)}")
        if target.is_floating_point() and target.shape != logits.shape:
            raise ValueError(f"soft targets must match logits {tuple(logits.shape)}, "
                             f"got {tuple(target.shape)}")
        if not (torch.is_grad_enabled() and logits.requires_grad):
            return _cross_entropy(logits, target, self.smoothing)
        return _PowerGradCE.apply(logits, target, self.alpha, self.smoothing)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, smoothing={self.smoothing}"


def wrap_loss(loss_fn: nn.Module, alpha: float) -> PowerGradCrossEntropy:
    """Return the PGT version of one of timm's cross-entropy-family training losses.

    Supported exactly: nn.CrossEntropyLoss (mean reduction, no class weights),
    timm's LabelSmoothingCrossEntropy and SoftTargetCrossEntropy. Anything else (BCE, JSD,
    subclasses that may change the maths) raises TypeError rather than guess.
    """
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    kind = type(loss_fn)
    if kind is nn.CrossEntropyLoss:
        if loss_fn.weight is not None or loss_fn.reduction != "mean":
            raise TypeError("wrap_loss: nn.CrossEntropyLoss with class weights or reduction "
                            f"{loss_fn.reduction!r} is not supported (only weight=None, 'mean')")
        return PowerGradCrossEntropy(alpha, smoothing=loss_fn.label_smoothing)
    if kind is LabelSmoothingCrossEntropy:
        return PowerGradCrossEntropy(alpha, smoothing=loss_fn.smoothing)
    if kind is SoftTargetCrossEntropy:
        return PowerGradCrossEntropy(alpha)
    if kind is PowerGradCrossEntropy:
        return PowerGradCrossEntropy(alpha, smoothing=loss_fn.smoothing)
    raise TypeError(
        f"wrap_loss: cannot apply PGT exactly to {kind.__module__}.{kind.__qualname__}; "
        "supported: nn.CrossEntropyLoss, timm LabelSmoothingCrossEntropy, "
        "timm SoftTargetCrossEntropy (PGT is defined for a softmax cross-entropy only)")


@torch.no_grad()
def logit_stats(logits: torch.Tensor, alpha: float) -> dict[str, float]:
    """The paper's diagnostics: mean L2 norm of the logits, entropy of p and of p'."""
    z = logits.detach().float()
    log_p = torch.log_softmax(z, dim=-1)
    log_p_alpha = torch.log_softmax(check_alpha(alpha) * z, dim=-1)
    return {
        "logit_norm": z.norm(dim=-1).mean().item(),
        "entropy_p": -(log_p.exp() * log_p).sum(-1).mean().item(),
        "entropy_p_alpha": -(log_p_alpha.exp() * log_p_alpha).sum(-1).mean().item(),
    }
