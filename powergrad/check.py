"""`powergrad check`: verify the PGT gradient on this machine against its closed form.

The closed form (softmax(alpha z) - q) / N * upstream is evaluated independently in float64
numpy, for every target kind, several batch sizes, loss scales and alphas, and dtypes.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from .transform import PowerGradCrossEntropy

NUM_CLASSES = 10


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


def run_checks(tolerance: float = 1e-6, verbose: bool = True) -> bool:
    gen = torch.Generator().manual_seed(0)
    worst, count = 0.0, 0
    cases = itertools.product(["hard", "smoothed", "soft", "soft+smoothed"],
                              [1, 8, 256],
                              [1.0, 2.0**8, 2.0**16, 2.0**24], [0.0, 0.05, 0.25, 1.0],
                              [torch.float32, torch.float64])
    for kind, n, scale, alpha, dtype in cases:
        z = torch.randn(n, NUM_CLASSES, generator=gen, dtype=dtype) * 3
        target, smoothing, q = _targets(kind, n, gen)
        logits = z.clone().requires_grad_()
        (PowerGradCrossEntropy(alpha, smoothing)(logits, target) * scale).backward()
        want = _closed_form(z.numpy(), q, alpha, scale)
        err = np.linalg.norm(logits.grad.double().numpy() - want) / np.linalg.norm(want)
        worst, count = max(worst, err), count + 1
    ok = worst < tolerance
    if verbose:
        print(f"PGT gradient vs float64 closed form: {count} cases "
              "(targets hard/smoothed/soft/soft+smoothed x batch 1/8/256 x loss scale 1..2^24 x "
              "alpha 0/0.05/0.25/1 x float32/float64)")
        print(f"  worst relative error {worst:.2e} (limit {tolerance:.0e}): {'OK' if ok else 'FAIL'}")
    return ok


def main() -> int:
    return 0 if run_checks() else 1
