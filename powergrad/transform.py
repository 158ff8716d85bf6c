"""The PowerGrad Transform (PGT), from "Altering Backward Pass Gradients improves Convergence"
(Das et al., arXiv 2111.12495).

Cross-entropy's gradient at the logits z is p - q with p = softmax(z) and q the target
distribution. PGT trains on p' - q instead, where p'_i = p_i^alpha / sum_j p_j^alpha, which is
the same thing as softmax(alpha * z). The forward value stays the ordinary cross-entropy, so
logged losses remain comparable with a baseline.

Exactness: p' is computed from the logits (their log-softmax, saved by the forward). The
authors' public hook instead rebuilds p from the incoming gradient assuming a loss scale of N^2,
which is only right at one batch size and loss scale. Here the upstream gradient (loss scale,
accumulation factor, mean over the batch) simply multiplies (p' - q) / N, as it would for
ordinary cross-entropy.

For the study only, `emulate_fork_fp16=True` reproduces what that hook computes in float16 when
its assumption holds (loss scale N^2): p as float16 holds it, so classes with p below 2^-25
(about 3e-8) become 0 and small ones are coarsely rounded, then p'_i = p16_i^alpha / sum.
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


class _PowerGradCE(torch.autograd.Function):
    """Value: F.cross_entropy. Gradient at the logits: grad_out * (softmax(alpha*z) - q) / N.

    The forward is cross-entropy's own (log-softmax, then the loss from it) and saves log p, as
    cross-entropy does. The backward builds p' from it: softmax(alpha z) = exp(alpha log p) / sum,
    with no max pass since alpha log p <= 0 cannot overflow and the largest term is at least
    C^-alpha. Four passes over [N, C] into one new buffer (two at alpha = 1), one more with
    smoothing; q is never built: its one-hot part is a scatter of N values.
    """

    @staticmethod
    def forward(ctx, logits, target, alpha, smoothing, emulate_fork_fp16=False):
        log_p = _log_probs(logits)
        ctx.save_for_backward(log_p, target)
        ctx.alpha, ctx.smoothing, ctx.dtype = alpha, smoothing, logits.dtype
        ctx.emulate_fork_fp16 = emulate_fork_fp16
        return _cross_entropy(log_p, target, smoothing)

    @staticmethod
    def backward(ctx, grad_out):
        log_p, target = ctx.saved_tensors
        n, c = log_p.shape
        eps, scale = ctx.smoothing, grad_out / n
        if ctx.emulate_fork_fp16:  # p as the fork's hook holds it, in float16
            grad = log_p.exp().half().to(log_p.dtype).pow_(ctx.alpha)
            row_scale = scale / grad.sum(dim=-1, keepdim=True)
        elif ctx.alpha == 1.0:
            grad, row_scale = log_p.exp(), scale  # exp(log p) is p, already normalised
        else:
            grad = log_p.mul(ctx.alpha).exp_()
            row_scale = scale / grad.sum(dim=-1, keepdim=True)
        grad.mul_(row_scale)
        if eps > 0.0:  # the uniform part of q (a separate pass: addcmul with two broadcast
            grad.sub_(scale * (eps / c))  # operands does not vectorise on the CPU)
        if target.is_floating_point():  # class probabilities, e.g. from timm's Mixup/CutMix
            grad.addcmul_(target, scale * (eps - 1.0))
        else:
            grad.scatter_add_(1, target.unsqueeze(1), (scale * (eps - 1.0)).expand(n, 1))
        return grad.to(ctx.dtype), None, None, None, None


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log softmax(z) in at least float32, as autocast computes cross-entropy."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _cross_entropy(log_p: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean cross-entropy from log p, with torch's smoothing: q = (1 - eps) t + eps / C."""
    n, c = log_p.shape
    if target.is_floating_point():
        loss = -(log_p * target.to(log_p.dtype)).sum() / n
    else:
        loss = F.nll_loss(log_p, target)
    if smoothing > 0.0:
        loss = (1.0 - smoothing) * loss - smoothing / c * log_p.sum() / n
    return loss


class PowerGradCrossEntropy(nn.Module):
    """Cross-entropy whose logit gradient is the PGT one.

    Targets: class indices [N] or class probabilities [N, C] (timm's Mixup/CutMix). Label
    smoothing eps applies to both as in F.cross_entropy: q = (1 - eps) t + eps / C (for indices
    this is timm's LabelSmoothingCrossEntropy; timm's train.py instead smooths inside Mixup and
    uses SoftTargetCrossEntropy, which wrap_loss maps to eps = 0, so nothing is smoothed twice).
    Reduction is the mean over the batch. Without autograd (eval, torch.no_grad) it is plain
    cross-entropy. alpha = 1 gives exactly the ordinary gradient.
    """

    def __init__(self, alpha: float, smoothing: float = 0.0, emulate_fork_fp16: bool = False):
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.emulate_fork_fp16 = bool(emulate_fork_fp16)
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
            return _cross_entropy(_log_probs(logits), target, self.smoothing)
        return _PowerGradCE.apply(logits, target, self.alpha, self.smoothing,
                                  self.emulate_fork_fp16)

    def extra_repr(self) -> str:
        fork = ", emulate_fork_fp16=True" if self.emulate_fork_fp16 else ""
        return f"alpha={self.alpha}, smoothing={self.smoothing}{fork}"


def wrap_loss(loss_fn: nn.Module, alpha: float,
              emulate_fork_fp16: bool = False) -> PowerGradCrossEntropy:
    """Return the PGT version of one of timm's cross-entropy-family training losses
    (emulate_fork_fp16: see the module's docstring; the study's option, not for training).

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
        return PowerGradCrossEntropy(alpha, loss_fn.label_smoothing, emulate_fork_fp16)
    if kind is LabelSmoothingCrossEntropy:
        return PowerGradCrossEntropy(alpha, loss_fn.smoothing, emulate_fork_fp16)
    if kind is SoftTargetCrossEntropy:
        return PowerGradCrossEntropy(alpha, 0.0, emulate_fork_fp16)
    if kind is PowerGradCrossEntropy:
        return PowerGradCrossEntropy(alpha, loss_fn.smoothing, emulate_fork_fp16)
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
