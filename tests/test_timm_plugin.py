"""PGT plugged into timm's own training API: `ClassificationTask(model, criterion=wrap_loss(...))`
on real timm models, checked against backpropagating the closed-form logit gradient."""
import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from timm.task import ClassificationTask

from powergrad import wrap_loss

MODELS = {
    "resnet18": dict(model_name="resnet18", num_classes=10),
    "vit_tiny": dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                     embed_dim=32, num_heads=2, num_classes=10),
}


def closed_form_logit_grad(logits: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    a = alpha * logits
    e = np.exp(a - a.max(1, keepdims=True))
    q = np.eye(logits.shape[1])[labels]
    return (e / e.sum(1, keepdims=True) - q) / logits.shape[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_classification_task_with_pgt_matches_the_closed_form(name):
    torch.manual_seed(0)
    model = timm.create_model(**MODELS[name]).double()
    reference = copy.deepcopy(model)
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    alpha = 0.25

    task = ClassificationTask(model, criterion=wrap_loss(nn.CrossEntropyLoss(), alpha), verbose=False)
    result = task(x, y)
    result["loss"].backward()

    logits = reference(x)
    grad = closed_form_logit_grad(logits.detach().numpy(), y.numpy(), alpha)
    logits.backward(torch.from_numpy(grad))
    for (pname, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.allclose(p.grad, r.grad, rtol=1e-9, atol=1e-12), pname
    # and it is not the ordinary gradient
    plain = copy.deepcopy(reference)
    plain.zero_grad()
    nn.functional.cross_entropy(plain(x), y).backward()
    assert not torch.allclose(plain.get_classifier().weight.grad, model.get_classifier().weight.grad)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_few_optimizer_steps_fit_a_fixed_batch(name):
    torch.manual_seed(1)
    model = timm.create_model(**MODELS[name])
    task = ClassificationTask(model, criterion=wrap_loss(nn.CrossEntropyLoss(label_smoothing=0.1), 0.25),
                              verbose=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = task(x, y)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]
