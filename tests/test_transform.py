"""PGT against its closed form, computed independently in float64 with numpy."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import (BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy,
                       SoftTargetCrossEntropy)

from powergrad import PowerGradCrossEntropy, logit_stats, powergrad_probs, wrap_loss

NUM_CLASSES = 10


def target_distribution(target, c, smoothing=0.0):
    """q = (1 - eps) * t + eps / C, t one-hot (class indices) or soft: torch's definition."""
    target = np.asarray(target)
    t = target.astype(np.float64) if target.ndim == 2 else np.eye(c)[target]
    return (1.0 - smoothing) * t + smoothing / c


def closed_form_grad(z, target, alpha, smoothing=0.0, upstream=1.0):
    """(softmax(alpha z) - q) / N * upstream, in float64 numpy."""
    z = np.asarray(z, dtype=np.float64)
    n, c = z.shape
    e = np.exp(alpha * z - (alpha * z).max(axis=1, keepdims=True))
    p_alpha = e / e.sum(axis=1, keepdims=True)
    return (p_alpha - target_distribution(target, c, smoothing)) / n * upstream


def closed_form_ce(z, target, smoothing=0.0):
    z = np.asarray(z, dtype=np.float64)
    log_p = z - z.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    return float(-(target_distribution(target, z.shape[1], smoothing) * log_p).sum(1).mean())


def make_batch(n, kind, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, NUM_CLASSES, generator=g) * scale
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    smoothing = 0.1 if kind in ("smoothed", "soft_smoothed") else 0.0
    if kind.startswith("soft"):  # a mixup-style pair mixture
        lam = 0.7
        other = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        target = lam * F.one_hot(labels, NUM_CLASSES).float() + (1 - lam) * F.one_hot(other, NUM_CLASSES).float()
        return z, target, smoothing
    return z, labels, smoothing


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


KINDS = ["hard", "smoothed", "soft", "soft_smoothed"]


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.25, 1.0])
@pytest.mark.parametrize("batch", [1, 7, 256])
@pytest.mark.parametrize("loss_scale", [1.0, 2.0**8, 2.0**16, 2.0**24])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_matches_closed_form(kind, loss_scale, batch, alpha):
    z, target, smoothing = make_batch(batch, kind, seed=batch)
    logits = z.clone().requires_grad_()
    loss = PowerGradCrossEntropy(alpha, smoothing=smoothing)(logits, target)
    (loss * loss_scale).backward()
    expected = closed_form_grad(z.numpy(), target.numpy(), alpha, smoothing, upstream=loss_scale)
    assert rel_err(logits.grad.numpy(), expected) < 1e-6
    assert abs(loss.item() - closed_form_ce(z.numpy(), target.numpy(), smoothing)) < 1e-5


@pytest.mark.parametrize("kind", ["hard", "smoothed", "soft"])
def test_value_is_ordinary_cross_entropy(kind):
    z, target, smoothing = make_batch(64, kind, seed=1)
    ours = PowerGradCrossEntropy(0.25, smoothing=smoothing)(z.clone().requires_grad_(), target)
    assert ours.item() == pytest.approx(F.cross_entropy(z, target, label_smoothing=smoothing).item(), rel=1e-6)
    timm_loss = SoftTargetCrossEntropy() if kind == "soft" else LabelSmoothingCrossEntropy(smoothing) if smoothing else nn.CrossEntropyLoss()
    assert ours.item() == pytest.approx(timm_loss(z, target).item(), rel=1e-6)


def test_smoothed_soft_targets_match_timm_mixup_smoothing():
    """timm's train.py smooths inside Mixup and trains SoftTargetCrossEntropy; smoothing a soft
    target in the loss instead (torch's definition) must give the same value and gradient."""
    from timm.data.mixup import mixup_target

    g = torch.Generator().manual_seed(13)
    z = torch.randn(16, NUM_CLASSES, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, NUM_CLASSES, (16,), generator=g)
    raw = mixup_target(labels, NUM_CLASSES, lam=0.7).double()
    smoothed = mixup_target(labels, NUM_CLASSES, lam=0.7, smoothing=0.1).double()
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss_a = PowerGradCrossEntropy(0.25, smoothing=0.1)(a, raw)
    loss_b = wrap_loss(SoftTargetCrossEntropy(), 0.25)(b, smoothed)
    loss_a.backward(), loss_b.backward()
    assert rel_err(a.grad.numpy(), closed_form_grad(z.numpy(), raw.numpy(), 0.25, 0.1)) < 1e-13
    assert rel_err(b.grad.numpy(), closed_form_grad(z.numpy(), smoothed.numpy(), 0.25)) < 1e-13
    assert loss_a.item() == pytest.approx(closed_form_ce(z.numpy(), raw.numpy(), 0.1), rel=1e-12)
    # the same up to timm building its targets in float32
    assert rel_err(a.grad.numpy(), b.grad.numpy()) < 1e-6
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-6)


def test_float64_is_exact_to_float64_precision():
    z, target, _ = make_batch(33, "hard", seed=2)
    logits = z.double().requires_grad_()
    PowerGradCrossEntropy(0.3)(logits, target).backward()
    assert logits.grad.dtype == torch.float64
    assert rel_err(logits.grad.numpy(), closed_form_grad(z.numpy(), target.numpy(), 0.3)) < 1e-13


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_one_is_the_ordinary_gradient(kind):
    z, target, smoothing = make_batch(16, kind, seed=3)
    z, target = z.double(), (target.double() if target.is_floating_point() else target)
    a = z.clone().requires_grad_()
    b = z.clone().requires_grad_()
    PowerGradCrossEntropy(1.0, smoothing=smoothing)(a, target).backward()
    F.cross_entropy(b, target, label_smoothing=smoothing).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)


def test_backward_twice_with_retain_graph_gives_the_same_gradient():
    z, target, smoothing = make_batch(16, "smoothed", seed=14)
    logits = z.clone().requires_grad_()
    loss = PowerGradCrossEntropy(0.25, smoothing=smoothing)(logits, target)
    loss.backward(retain_graph=True)
    loss.backward()  # saved tensors must not have been changed by the first backward
    expected = closed_form_grad(z.numpy(), target.numpy(), 0.25, smoothing, upstream=2.0)
    assert rel_err(logits.grad.numpy(), expected) < 1e-6


@pytest.mark.parametrize("scale", [30.0, 3000.0])
def test_large_logits_stay_exact(scale):
    """p' is built from log p; logits far apart must neither overflow nor lose precision."""
    z, target, _ = make_batch(64, "hard", seed=15, scale=scale)
    for alpha in (0.05, 1.0):
        logits = z.clone().requires_grad_()
        PowerGradCrossEntropy(alpha)(logits, target).backward()
        assert rel_err(logits.grad.numpy(), closed_form_grad(z.numpy(), target.numpy(), alpha)) < 1e-6


def test_alpha_zero_uses_the_uniform_distribution():
    z, target, _ = make_batch(5, "hard", seed=4)
    torch.testing.assert_close(powergrad_probs(z, 0.0), torch.full((5, NUM_CLASSES), 0.1))


def test_gradient_accumulation_sums_the_micro_batch_gradients():
    z, target, _ = make_batch(24, "hard", seed=5)
    logits = z.clone().requires_grad_()
    loss_fn = PowerGradCrossEntropy(0.25)
    for part in (slice(0, 8), slice(8, 24)):  # unequal micro-batches, each loss / 2
        (loss_fn(logits[part], target[part]) / 2).backward()
    expected = np.zeros_like(z.numpy(), dtype=np.float64)
    expected[:8] = closed_form_grad(z[:8].numpy(), target[:8].numpy(), 0.25, upstream=0.5)
    expected[8:] = closed_form_grad(z[8:].numpy(), target[8:].numpy(), 0.25, upstream=0.5)
    assert rel_err(logits.grad.numpy(), expected) < 1e-6


def test_bf16_autocast_within_bf16_tolerance():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(32, 20, generator=g)
    w = (torch.randn(NUM_CLASSES, 20, generator=g) * 0.3).requires_grad_()
    target = torch.randint(0, NUM_CLASSES, (32,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = x @ w.t()
        assert logits.dtype == torch.bfloat16
        logits.retain_grad()
        logits_leaf = logits
        loss = PowerGradCrossEntropy(0.25)(logits, target)
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits_leaf.grad.dtype == torch.bfloat16
    expected = closed_form_grad(logits_leaf.detach().float().numpy(), target.numpy(), 0.25)
    assert rel_err(logits_leaf.grad.float().numpy(), expected) < 1e-2  # bf16 has 8 bits of mantissa


@pytest.mark.parametrize("init_scale", [1.0, 2.0**8, 2.0**16])
def test_fp16_autocast_with_grad_scaler(init_scale):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 20, generator=g)
    w = nn.Parameter(torch.randn(NUM_CLASSES, 20, generator=g) * 0.5)
    target = torch.randint(0, NUM_CLASSES, (16,), generator=g)
    opt = torch.optim.SGD([w], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    with torch.autocast("cpu", dtype=torch.float16):
        logits = x @ w.t()
        logits.retain_grad()
        loss = PowerGradCrossEntropy(0.05)(logits, target)
    assert logits.dtype == torch.float16
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    z = logits.detach().float().numpy()
    expected_logit_grad = closed_form_grad(z, target.numpy(), 0.05, upstream=init_scale)
    assert rel_err(logits.grad.float().numpy(), expected_logit_grad) < 2e-3  # fp16 rounding
    expected_w_grad = closed_form_grad(z, target.numpy(), 0.05).T @ x.double().numpy()
    assert rel_err(w.grad.numpy(), expected_w_grad) < 2e-3


def test_torch_compile_gives_the_same_gradient():
    z, target, _ = make_batch(32, "smoothed", seed=8)
    loss_fn = PowerGradCrossEntropy(0.25, smoothing=0.1)
    compiled = torch.compile(lambda logits, t: loss_fn(logits * 1.0, t))
    a = z.clone().requires_grad_()
    compiled(a, target).backward()
    expected = closed_form_grad(z.numpy(), target.numpy(), 0.25, 0.1)
    assert rel_err(a.grad.numpy(), expected) < 1e-6


def test_sgd_update_differs_from_baseline_as_the_closed_form_says():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    target = torch.randint(0, NUM_CLASSES, (12,), generator=g)
    w0 = torch.randn(NUM_CLASSES, 6, generator=g, dtype=torch.float64)
    lr, alpha = 0.5, 0.25

    def step(loss_fn):
        layer = nn.Linear(6, NUM_CLASSES, bias=False).double()
        layer.weight.data.copy_(w0)
        opt = torch.optim.SGD(layer.parameters(), lr=lr)
        loss_fn(layer(x), target).backward()
        opt.step()
        return layer.weight.detach().numpy()

    w_pgt, w_base = step(PowerGradCrossEntropy(alpha)), step(nn.CrossEntropyLoss())
    z = (x @ w0.t()).numpy()
    # closed form: W' = W - lr * G^T x, G the logit gradient
    base_expected = w0.numpy() - lr * closed_form_grad(z, target.numpy(), 1.0).T @ x.numpy()
    pgt_expected = w0.numpy() - lr * closed_form_grad(z, target.numpy(), alpha).T @ x.numpy()
    np.testing.assert_allclose(w_base, base_expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w_pgt, pgt_expected, rtol=1e-12, atol=1e-12)
    # and the difference between the two updates is lr * (p - p')^T x / N
    p_diff = closed_form_grad(z, target.numpy(), 1.0) - closed_form_grad(z, target.numpy(), alpha)
    np.testing.assert_allclose(w_pgt - w_base, lr * p_diff.T @ x.numpy(), rtol=1e-10, atol=1e-12)
    assert np.abs(w_pgt - w_base).max() > 1e-3


def test_no_grad_and_eval_are_plain_cross_entropy():
    z, target, _ = make_batch(8, "hard", seed=10)
    loss_fn = PowerGradCrossEntropy(0.25).eval()
    with torch.no_grad():
        value = loss_fn(z.clone().requires_grad_(), target)
    assert value.grad_fn is None
    assert value.item() == pytest.approx(F.cross_entropy(z, target).item(), rel=1e-6)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), 2])
def test_invalid_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha must lie in"):
        PowerGradCrossEntropy(alpha)
    with pytest.raises(ValueError, match="alpha must lie in"):
        wrap_loss(nn.CrossEntropyLoss(), alpha)


def test_wrap_loss_keeps_the_smoothing_and_target_kind():
    assert wrap_loss(nn.CrossEntropyLoss(label_smoothing=0.2), 0.3).smoothing == 0.2
    wrapped = wrap_loss(LabelSmoothingCrossEntropy(smoothing=0.1), 0.3)
    assert (wrapped.alpha, wrapped.smoothing) == (0.3, 0.1)
    soft = wrap_loss(SoftTargetCrossEntropy(), 0.05)
    z, target, _ = make_batch(6, "soft", seed=11)
    logits = z.clone().requires_grad_()
    soft(logits, target).backward()
    assert rel_err(logits.grad.numpy(), closed_form_grad(z.numpy(), target.numpy(), 0.05)) < 1e-6


@pytest.mark.parametrize("loss", [BinaryCrossEntropy(), JsdCrossEntropy(), nn.NLLLoss(),
                                  nn.CrossEntropyLoss(reduction="sum"),
                                  nn.CrossEntropyLoss(weight=torch.ones(NUM_CLASSES))])
def test_unsupported_losses_raise(loss):
    with pytest.raises(TypeError, match="wrap_loss"):
        wrap_loss(loss, 0.25)


def test_logit_stats_against_numpy():
    z, _, _ = make_batch(9, "hard", seed=12)
    stats = logit_stats(z, 0.25)
    zz = z.double().numpy()

    def entropy(a):
        e = np.exp(a - a.max(1, keepdims=True))
        p = e / e.sum(1, keepdims=True)
        return float(-(p * np.log(p)).sum(1).mean())

    assert stats["logit_norm"] == pytest.approx(np.linalg.norm(zz, axis=1).mean(), rel=1e-6)
    assert stats["entropy_p"] == pytest.approx(entropy(zz), rel=1e-5)
    assert stats["entropy_p_alpha"] == pytest.approx(entropy(0.25 * zz), rel=1e-5)
    assert stats["entropy_p_alpha"] > stats["entropy_p"]  # alpha < 1 flattens p


@pytest.mark.parametrize("alpha", [0.05, 0.25, 1.0])
@pytest.mark.parametrize("kind", ["hard", "smoothed", "soft"])
def test_fork_fp16_emulation_rounds_p_to_float16_before_the_power(kind, alpha):
    # The study's emulation of the authors' hook (p held in float16), against numpy in float64.
    z, target, smoothing = make_batch(64, kind, seed=5, scale=12.0)  # many p below 3e-8
    z64 = z.double()
    log_p = z64.numpy() - z64.numpy().max(1, keepdims=True)
    p = np.exp(log_p) / np.exp(log_p).sum(1, keepdims=True)
    p16 = p.astype(np.float16).astype(np.float64)
    assert ((p16 == 0) & (p > 0)).any() and (p16 == 0).sum() > 50  # the flush happens here
    powered = p16 ** alpha
    q = target_distribution(target.numpy(), NUM_CLASSES, smoothing)
    want = (powered / powered.sum(1, keepdims=True) - q) / len(z)
    loss = wrap_loss(nn.CrossEntropyLoss(label_smoothing=smoothing), alpha,
                     emulate_fork_fp16=True)
    if kind == "soft":
        loss = wrap_loss(SoftTargetCrossEntropy(), alpha, emulate_fork_fp16=True)
    logits = z64.clone().requires_grad_()
    loss(logits, target.double() if kind == "soft" else target).backward()
    assert rel_err(logits.grad.numpy(), want) < 1e-12
    exact = closed_form_grad(z64.numpy(), target.numpy(), alpha, smoothing)
    assert rel_err(want, exact) > 1e-9  # the emulation is not the exact transform
