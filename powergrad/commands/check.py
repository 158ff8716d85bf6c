"""`powergrad check`: verify the PGT gradient on this machine against its closed form.

The closed form (softmax(alpha z) - q) / N * upstream is evaluated independently in float64
numpy, for every target kind, several batch sizes, loss scales and alphas, and dtypes:
float32 and float64 logits, and logits made by a Linear layer under bf16 autocast and under
fp16 autocast with a GradScaler (its scale is the upstream factor), on the CPU and, when
present, on CUDA. Low-precision cases compare the gradient the model receives (rounded to the
logits' dtype) with the closed form at the same rounded logits, so their limit is that dtype's
rounding: bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3), fp16 keeps 11
(2^-11 = 4.9e-4); each limit is about twice that.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from powergrad.transform import PowerGradCrossEntropy

NUM_CLASSES = 10
TARGET_KINDS = ["hard", "smoothed", "soft", "soft+smoothed"]
# limits on the relative error (norm of the difference / norm of the closed form)
LIMITS = {torch.float64: 1e-6, torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# fp16 scales: GradScaler's default start (2^16) and two below it; at N >= 2 none overflows
# fp16 (|grad| <= scale / N <= 2^15), so every case must come back finite and exact.
FP16_SCALES = [1.0, 2.0**8, 2.0**16]


def _closed_form(z: np.ndarray, q: np.ndarray, alpha: float, upstream: float) -> np.ndarray:
    a = alpha * z.astype(np.float64)
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True) - q) / z.shape[0] * upstream


def _targets(kind: str, n: int, gen: torch.Generator):
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    onehot = F.one_hot(labels, NUM_CLASSES).double().numpy()
    if kind == "hard":
        return labels, 0.0, onehot
    if kind == "smoothed":
        return labels, 0.1, onehot * 0.9 + 0.1 / NUM_CLASSES
    soft = 0.6 * onehot + 0.4 * np.roll(onehot, 1, axis=1)  # a mixup-style mixture
    if kind == "soft":
        return torch.from_numpy(soft).float(), 0.0, soft
    # smoothing applies to soft targets too, as in torch: q = 0.9 * soft + 0.1 / C
    return torch.from_numpy(soft).float(), 0.1, soft * 0.9 + 0.1 / NUM_CLASSES


def _relative_error(grad: torch.Tensor, want: np.ndarray) -> float:
    got = grad.detach().double().cpu().numpy()
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _plain_case(kind, n, scale, alpha, dtype, gen) -> float:
    z = torch.randn(n, NUM_CLASSES, generator=gen, dtype=dtype) * 3
    target, smoothing, q = _targets(kind, n, gen)
    logits = z.clone().requires_grad_()
    (PowerGradCrossEntropy(alpha, smoothing)(logits, target) * scale).backward()
    return _relative_error(logits.grad, _closed_form(z.numpy(), q, alpha, scale))


def autocast_case(kind, n, scale, alpha, dtype, device, gen) -> float:
    """Logits from a Linear layer under autocast, loss scaled by a GradScaler for fp16 (bf16
    needs none): the logit gradient divided by the scale against the closed form."""
    features = torch.randn(n, 32, generator=gen).to(device)
    layer = nn.Linear(32, NUM_CLASSES).to(device)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(NUM_CLASSES, 32, generator=gen) * 0.6)
    target, smoothing, q = _targets(kind, n, gen)
    with torch.autocast(device.type, dtype=dtype):
        logits = layer(features)
        loss = PowerGradCrossEntropy(alpha, smoothing)(logits, target.to(device))
    if logits.dtype != dtype:  # the case must really run in low precision
        raise RuntimeError(f"autocast on {device} gave {logits.dtype} logits, not {dtype}")
    logits.retain_grad()
    scaler = torch.amp.GradScaler(device.type, init_scale=scale,
                                  enabled=dtype is torch.float16)
    scaler.scale(loss).backward()
    used_scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    want = _closed_form(logits.detach().double().cpu().numpy(), q, alpha, 1.0)
    return _relative_error(logits.grad.double() / used_scale, want)


def run_checks(tolerance: float | None = None, verbose: bool = True) -> bool:
    """Every group of cases within its limit (`tolerance` overrides the float32/64 limit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # [256, 10] tensors gain nothing from threads; a busy core costs 6x
    try:
        return _run_checks(tolerance, verbose)
    finally:
        torch.set_num_threads(threads)


def _run_checks(tolerance: float | None, verbose: bool) -> bool:
    gen = torch.Generator().manual_seed(0)
    groups = []  # (label, count, worst, limit)

    plain = itertools.product(TARGET_KINDS, [1, 8, 256], [1.0, 2.0**8, 2.0**16, 2.0**24],
                              [0.0, 0.05, 0.25, 1.0], [torch.float32, torch.float64])
    errors = [_plain_case(*case, gen) for case in plain]
    groups.append(("float32/float64 logits: targets hard/smoothed/soft/soft+smoothed x batch "
                   "1/8/256 x loss scale 1..2^24 x alpha 0/0.05/0.25/1",
                   len(errors), max(errors), tolerance or LIMITS[torch.float32]))

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype, scales, label in [
                (torch.bfloat16, [1.0], "bf16 autocast"),
                (torch.float16, FP16_SCALES, "fp16 autocast + GradScaler at scale 1/2^8/2^16")]:
            cases = itertools.product(TARGET_KINDS, [8, 256], scales, [0.0, 0.25, 1.0])
            errors = [autocast_case(kind, n, scale, alpha, dtype, device, gen)
                      for kind, n, scale, alpha in cases]
            groups.append((f"{label} on {device.type}: targets x batch 8/256 x alpha 0/0.25/1",
                           len(errors), max(errors), LIMITS[dtype]))

    ok = all(worst < limit for _, _, worst, limit in groups)
    if verbose:
        print("PGT gradient vs the float64 closed form (relative error, worst case per group):")
        for label, count, worst, limit in groups:
            verdict = "OK" if worst < limit else "FAIL"
            print(f"  {label}: {count} cases, worst {worst:.2e} (limit {limit:.0e}): {verdict}")
        print("all OK" if ok else "FAILED")
    return ok


def main() -> int:
    return 0 if run_checks() else 1
