"""GPAS: the gate against its closed forms (float64), every variant's block against an
independent transcription of the official code's formulas (float64, with gradients), the block
surgery on tiny timm ViTs, the residual-stream probe, and GPAS together with PGT."""
import copy
import io
import math
import typing
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from powergrad.config.schema import GPASConfig
from powergrad.gpas import (DEEPNORM_SCALED_INITS, GATE_MODES, VARIANTS, GPASBlock, ResidualGate,
                            ResidualStreamProbe, apply_gpas, gpas_gates)

DEPTH, DIM, CLASSES = 3, 32, 10
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def tiny_vit(seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                             depth=DEPTH, embed_dim=DIM, num_heads=2, num_classes=CLASSES,
                             **kwargs)


def images(n=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


def silu64(g):
    return g / (1.0 + math.exp(-g))


def silu_grad64(g):
    s = 1.0 / (1.0 + math.exp(-g))
    return s * (1.0 + g * (1.0 - s))


def set_gates(model, start=0.3, step=-0.25):
    """Give every gate a distinct non-zero value, so closed forms are not trivially at g = 0."""
    value = start
    with torch.no_grad():
        for block in model.blocks:
            for _, gate in gpas_gates(block):
                gate.g.fill_(value)
                value += step


def assert_close64(actual, expected, rtol):
    """Relative error of `actual` against a float64 reference, measured on the whole tensor."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    scale = expected.abs().max().clamp_min(1e-30)
    assert (actual - expected).abs().max() / scale <= rtol


# ---------------------------------------------------------------- the gate, in isolation

@pytest.mark.parametrize("g", [0.0, 0.7, -1.3])
def test_gate_forward_is_one_minus_silu_times_h(g):
    h = torch.randn(3, 5, 7)
    out = ResidualGate(init=g)(h)
    assert_close64(out, (1.0 - silu64(g)) * h.double(), rtol=1e-6)


def gate_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, 7, generator=gen).requires_grad_(), torch.randn(3, 5, 7, generator=gen)


def assert_gate_grad(gate, h, upstream, g):
    """g's gradient against -silu'(g) <upstream, h> in float64; float32 rounding of the dot
    product is bounded by the size of its terms, not of its (cancelling) sum."""
    terms = upstream.double() * h.detach().double()
    expected = -silu_grad64(g) * terms.sum()
    bound = 1e-6 * abs(silu_grad64(g)) * terms.abs().sum()
    assert abs(gate.g.grad.item() - expected.item()) <= bound


@pytest.mark.parametrize("g", [0.0, 0.7, -1.3])
def test_gate_gradients_with_stop_gradient(g):
    h, upstream = gate_inputs(seed=2)
    gate = ResidualGate(init=g)
    gate(h).backward(upstream)
    assert torch.equal(h.grad, upstream)  # the identity, bit for bit
    assert_gate_grad(gate, h, upstream, g)


@pytest.mark.parametrize("g", [0.7, -1.3])
def test_gate_without_stop_gradient_scales_the_gradient(g):
    h, upstream = gate_inputs(seed=3)
    gate = ResidualGate(init=g, stop_gradient=False)
    gate(h).backward(upstream)
    assert_close64(h.grad, (1.0 - silu64(g)) * upstream.double(), rtol=1e-6)
    assert_gate_grad(gate, h, upstream, g)


def test_fixed_gate_is_a_buffer():
    gate = ResidualGate(init=0.5, learnable=False)
    assert list(gate.parameters()) == []
    assert list(gate.state_dict()) == ["g"]
    h = torch.randn(4, 6)
    assert_close64(gate(h), (1.0 - silu64(0.5)) * h.double(), rtol=1e-6)


# ---------------------------------------------------------------- block surgery

def test_pre_gpas_at_zero_equals_unmodified_model_and_loads_into_it():
    base = tiny_vit(init_values=1e-2).eval()
    model = apply_gpas(copy.deepcopy(base)).eval()
    x, _ = images()
    assert torch.equal(model(x), base(x))

    fresh = tiny_vit(seed=5, init_values=1e-2).eval()  # different weights until loaded
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    assert missing == []
    assert sorted(unexpected) == [f"blocks.{i}.gpas.g" for i in range(DEPTH)]
    assert torch.equal(fresh(x), model(x))


# ---------------------------------------------------------------- against the official code
# An independent float64 transcription of the GPAS authors' layer formulas (LlamaDecoderLayer
# and GPASBlock in github.com/dandingsky/GPAS, peft_pretraining/modeling_llama.py, Apache-2.0),
# with LLaMA's sublayers (RMSNorm, rotary attention, SwiGLU) replaced by the ViT block's
# (LayerNorm, softmax attention, GELU MLP) and timm's layer scale on each branch. Plain tensor
# ops on its own copies of the weights: no code shared with GPASBlock or timm's modules, so
# its gradients come from a separate autograd graph.

def layer_norm64(x, weight, bias, eps=1e-6):
    centred = x - x.mean(-1, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * weight + bias


def attention64(x, w, heads):
    batch, tokens, dim = x.shape
    q, k, v = (x @ w["attn.qkv.weight"].T + w["attn.qkv.bias"]).split(dim, dim=-1)
    by_head = lambda t: t.reshape(batch, tokens, heads, dim // heads).transpose(1, 2)
    q, k, v = by_head(q), by_head(k), by_head(v)
    mixing = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1)
    mixed = (mixing @ v).transpose(1, 2).reshape(batch, tokens, dim)
    return mixed @ w["attn.proj.weight"].T + w["attn.proj.bias"]


def mlp64(x, w):
    hidden = x @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"]
    hidden = 0.5 * hidden * (1.0 + torch.erf(hidden / math.sqrt(2.0)))  # exact GELU
    return hidden @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"]


def official_gate(g):
    """GPASBlock.forward of the official code: hidden - silu(gate) * hidden.detach()."""
    return lambda h: h - g * torch.sigmoid(g) * h.detach()


def official_layer64(x, w, variant, gate, depth, heads):
    """One layer, step by step as in the official forward; `gate` None is the ungated layer."""
    if gate == "block":  # one gate per layer, applied after both residual adds
        gate_attn = gate_mlp = official_gate(w["gpas.g"])
    elif gate == "add":  # this project's extension: one gate per add
        gate_attn, gate_mlp = official_gate(w["gpas_attn.g"]), official_gate(w["gpas_mlp.g"])
    else:
        gate_attn = gate_mlp = lambda h: h
    norm = lambda h, name: layer_norm64(h, w[name + ".weight"], w[name + ".bias"])
    if variant == "deepnorm":  # 'deeppost' and 'deeppost_gpas'
        alpha = (2.0 * depth) ** 0.25
        residual = alpha * gate_attn(x)  # the gate sees the skip branch only
        hidden = norm(residual + w["ls1.gamma"] * attention64(x, w, heads), "norm1")
        residual = alpha * gate_mlp(hidden)
        return norm(residual + w["ls2.gamma"] * mlp64(hidden, w), "norm2")
    # 'pre', 'lns' (the same formulas; only the norm weights' init differs) and 'sandwich'
    out_norm = ((lambda h, i: norm(h, f"out_norm{i}")) if variant == "sandwich"
                else (lambda h, i: h))
    residual = x
    hidden = out_norm(attention64(norm(x, "norm1"), w, heads), 1)
    hidden = gate_attn(residual + w["ls1.gamma"] * hidden)
    residual = hidden
    hidden = out_norm(mlp64(norm(hidden, "norm2"), w), 2)
    return gate_mlp(residual + w["ls2.gamma"] * hidden)


def perturb_(model, seed=7):
    """Move every weight off its initial value (norm weights off 1, biases and layer scales
    off their constants), so a misplaced norm, scale or bias changes the result."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.blocks.named_parameters():
            if not name.endswith(".g"):
                noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                p.mul_(1.0 + 0.3 * noise).add_(0.05 * torch.randn(p.shape, generator=gen,
                                                                  dtype=p.dtype))


def official_comparison(variant, gate, stop_gradient=True):
    """Relative errors (max |ours - official| / max |official|) of the output, the input
    gradient and every parameter's gradient of the whole block stack, in train mode."""
    heads = 2
    model = apply_gpas(tiny_vit(init_values=0.5), variant=variant, gate=gate,
                       stop_gradient=stop_gradient)
    set_gates(model)
    perturb_(model)
    model = model.double().train()
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 17, DIM, generator=gen, dtype=torch.float64)
    upstream = torch.randn(2, 17, DIM, generator=gen, dtype=torch.float64)

    ours_in = x.clone().requires_grad_()
    ours = ours_in
    for block in model.blocks:
        ours = block(ours)
    ours.backward(upstream)

    official_weights = [{name: p.detach().clone().requires_grad_()
                         for name, p in block.named_parameters()} for block in model.blocks]
    official_in = x.clone().requires_grad_()
    official = official_in
    for w in official_weights:
        official = official_layer64(official, w, variant, gate, DEPTH, heads)
    official.backward(upstream)

    def error(actual, expected):
        assert actual is not None and expected is not None  # every parameter takes part
        return ((actual - expected).abs().max() / expected.abs().max()).item()

    errors = {"output": error(ours.detach(), official.detach()),
              "input": error(ours_in.grad, official_in.grad)}
    for i, (block, w) in enumerate(zip(model.blocks, official_weights)):
        assert sorted(w) == sorted(n for n, _ in block.named_parameters())
        for name, p in block.named_parameters():
            errors[f"blocks.{i}.{name}"] = error(p.grad, w[name].grad)
    return errors


@pytest.mark.parametrize("gate", GATE_MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_blocks_match_the_official_formulas_with_gradients(variant, gate):
    errors = official_comparison(variant, gate)
    gates = [k for k in errors if k.endswith(".g")]
    assert len(gates) == {None: 0, "block": DEPTH, "add": 2 * DEPTH}[gate]
    bad = {k: v for k, v in errors.items() if not v <= 1e-10}
    assert bad == {}


@pytest.mark.parametrize("gate", ["block", "add"])
def test_official_comparison_tells_gpas_from_its_ablation(gate):
    """Without the stop-gradient the forward is the same but the gradients are not: the
    comparison above would fail for the ablation."""
    errors = official_comparison("pre", gate, stop_gradient=False)
    assert errors["output"] <= 1e-10
    assert errors["input"] > 1e-2
    first_block = [k for k in errors if k.startswith("blocks.0.")]
    assert all(errors[k] > 1e-3 for k in first_block)


def test_lns_initialises_norm_weights():
    model = apply_gpas(tiny_vit(), variant="lns", gate=None)
    for i, block in enumerate(model.blocks):
        for norm in (block.norm1, block.norm2):
            assert_close64(norm.weight, torch.full((DIM,), 1.0 / math.sqrt(i + 1.0)), rtol=1e-7)


@pytest.mark.parametrize("gate, scaled_init", [(None, "baseline"), ("block", "always"),
                                               ("add", "always")])
def test_deepnorm_alpha_and_scaled_init(gate, scaled_init):
    model = apply_gpas(tiny_vit(), variant="deepnorm", gate=gate,
                       deepnorm_scaled_init=scaled_init)
    alpha, beta = (2.0 * DEPTH) ** 0.25, (8.0 * DEPTH) ** -0.25
    xavier = lambda fan_in, fan_out, gain: gain * math.sqrt(2.0 / (fan_in + fan_out))
    pooled = {"q": [], "v": [], "proj": [], "fc1": [], "fc2": []}
    for block in model.blocks:
        assert block.skip_scale == pytest.approx(alpha, rel=1e-12)
        q, _, v = block.attn.qkv.weight.detach().chunk(3)
        pooled["q"].append(q.flatten())
        pooled["v"].append(v.flatten())
        pooled["proj"].append(block.attn.proj.weight.detach().flatten())
        pooled["fc1"].append(block.mlp.fc1.weight.detach().flatten())
        pooled["fc2"].append(block.mlp.fc2.weight.detach().flatten())
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert torch.count_nonzero(linear.bias) == 0
    hidden = 4 * DIM
    expected = {"q": xavier(DIM, DIM, 1.0), "v": xavier(DIM, DIM, beta),
                "proj": xavier(DIM, DIM, beta), "fc1": xavier(DIM, hidden, beta),
                "fc2": xavier(hidden, DIM, beta)}
    for name, weights in pooled.items():  # >= 3000 samples each: std within ~3 %
        assert torch.cat(weights).double().std().item() == pytest.approx(expected[name], rel=0.1)


@pytest.mark.parametrize("gate", ["block", "add"])
def test_deepnorm_with_gpas_keeps_timms_init_by_default(gate):
    """The official code gives DeepNet's init to its ungated DeepNorm model only."""
    plain = tiny_vit(seed=3)
    model = apply_gpas(tiny_vit(seed=3), variant="deepnorm", gate=gate)
    assert all(block.skip_scale == pytest.approx((2.0 * DEPTH) ** 0.25) for block in model.blocks)
    weights = model.state_dict()
    for name, value in plain.state_dict().items():
        assert torch.equal(weights[name], value), name


def test_deepnorm_gpas_recipe_follows_the_official_init():
    from powergrad.config.loading import load_recipe
    from powergrad.training.models import build_model

    recipe = RECIPES / "fashion_mnist" / "vit_deepnorm_gpas.yaml"
    linears = lambda model: [m.weight for m in model.blocks.modules()
                             if isinstance(m, torch.nn.Linear)]

    def build(*overrides):
        torch.manual_seed(0)
        return build_model(load_recipe(recipe, list(overrides)).model)

    plain = build("model.gpas.enabled=false", "model.gpas.variant=pre")
    official, scaled = build(), build("model.gpas.deepnorm_scaled_init=always")
    assert all(isinstance(b, GPASBlock) and b.gpas_gate == "block" for b in official.blocks)
    assert all(torch.equal(a, b) for a, b in zip(linears(official), linears(plain)))
    assert not any(torch.equal(a, b) for a, b in zip(linears(scaled), linears(plain)))


@pytest.mark.parametrize("gate", GATE_MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_saves_loads_and_deepcopies(variant, gate):
    build = lambda: apply_gpas(tiny_vit(drop_path_rate=0.1, init_values=0.1),
                               variant=variant, gate=gate)
    model = build().train()
    x, y = images(8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    for block in model.blocks:
        for _, g in gpas_gates(block):
            assert g.g.item() != 0.0  # the gates learn

    model.eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = build().eval()
    restored.load_state_dict(torch.load(buffer, weights_only=True))  # strict
    assert torch.equal(restored(x), model(x))

    twin = copy.deepcopy(model)
    assert all(isinstance(b, GPASBlock) for b in twin.blocks)
    assert torch.equal(twin(x), model(x))
    assert twin.forward_features(x).shape == (8, 1 + 16, DIM)
    twin.reset_classifier(5)
    assert twin(x).shape == (8, 5)
    assert model(x).shape == (8, CLASSES)  # the original keeps its head


def test_gate_counts_and_names():
    def gate_params(gate, learnable=True):
        model = apply_gpas(tiny_vit(), gate=gate, learnable=learnable)
        return sorted(n for n, _ in model.named_parameters() if "gpas" in n)

    assert gate_params("block") == [f"blocks.{i}.gpas.g" for i in range(DEPTH)]
    assert gate_params("add") == sorted(f"blocks.{i}.gpas_{kind}.g" for i in range(DEPTH)
                                        for kind in ("attn", "mlp"))
    assert gate_params(None) == []
    assert gate_params("add", learnable=False) == []


def test_fixed_gates_add_no_trainable_parameter():
    base = tiny_vit().eval()
    model = apply_gpas(copy.deepcopy(base), gate="add", learnable=False, init=0.5).eval()
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert count(model) == count(base)
    buffers = {n: b.item() for n, b in model.named_buffers() if "gpas" in n}
    assert len(buffers) == 2 * DEPTH and set(buffers.values()) == {0.5}
    x, _ = images()
    assert not torch.allclose(model(x), base(x))  # a non-zero fixed gate does scale the stream


def test_the_layouts_gpas_builds_are_the_ones_a_recipe_may_name():
    # gpas.py sits below the config layer, so it keeps its own lists: they must be the
    # schema's Literals (a value only one side knows is refused by loading or by apply_gpas)
    hints = typing.get_type_hints(GPASConfig)
    assert VARIANTS == typing.get_args(hints["variant"])
    assert GATE_MODES == (None, *typing.get_args(hints["gate"]))  # None: gpas.enabled false
    assert DEEPNORM_SCALED_INITS == typing.get_args(hints["deepnorm_scaled_init"])


def test_apply_gpas_rejects_bad_input():
    with pytest.raises(ValueError):
        apply_gpas(tiny_vit(), variant="post")
    with pytest.raises(ValueError):
        apply_gpas(tiny_vit(), gate="layer")
    with pytest.raises(ValueError):
        apply_gpas(apply_gpas(tiny_vit()))
    with pytest.raises(ValueError, match="deepnorm_scaled_init"):
        apply_gpas(tiny_vit(), variant="deepnorm", deepnorm_scaled_init="gated")
    with pytest.raises(TypeError):
        apply_gpas(torch.nn.Linear(3, 3))


# ---------------------------------------------------------------- the probe

def block_outputs64(model, x):
    """Each block's output recomputed in float64, outside any hook."""
    model = copy.deepcopy(model).double()
    for block in model.blocks:
        block._forward_hooks.clear()
    with torch.no_grad():
        t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x.double()))))
        outputs = []
        for block in model.blocks:
            t = block(t)
            outputs.append(t)
    return outputs


@pytest.mark.parametrize("gate", ["add", None])
def test_probe_matches_independent_computation(gate):
    model = apply_gpas(tiny_vit(init_values=0.5), gate=gate) if gate else tiny_vit(init_values=0.5)
    set_gates(model)
    reference = copy.deepcopy(model)
    x, y = images()
    probe = ResidualStreamProbe(model)
    logits = model(x)
    assert torch.equal(logits, reference(x))  # the probe changes nothing
    F.cross_entropy(logits, y).backward()
    stats = probe.stats()

    for i, (block, out) in enumerate(zip(model.blocks, block_outputs64(model, x))):
        label = f"block{i:02d}"
        assert stats[f"gpas/var/{label}"] == pytest.approx(((out - out.mean()) ** 2).mean().item(),
                                                           rel=1e-5)
        gate_ids = {id(g.g) for _, g in gpas_gates(block)}
        squares = sum((p.grad.double() ** 2).sum() for p in block.parameters()
                      if id(p) not in gate_ids)
        assert stats[f"gpas/grad_norm/{label}"] == pytest.approx(math.sqrt(squares), rel=1e-5)
        for suffix, g in gpas_gates(block):
            assert stats[f"gpas/gate/{label}{suffix}"] == g.g.item()
            assert stats[f"gpas/gate_scale/{label}{suffix}"] == pytest.approx(
                1.0 - silu64(g.g.item()), rel=1e-6)

    kinds = ("var", "grad_norm") + (("gate", "gate_scale") if gate else ())
    per_block = 2 if gate == "add" else 1
    expected_count = DEPTH * (2 + (2 * per_block if gate else 0))
    assert len(stats) == expected_count
    assert {k.split("/")[1] for k in stats} == set(kinds)

    probe.close()
    assert all(len(b._forward_hooks) == 0 for b in model.blocks)


def test_probe_disabled_and_deepcopy_do_not_record():
    model = tiny_vit()
    x, _ = images()
    probe = ResidualStreamProbe(model, enabled=False)
    with torch.no_grad():
        model(x)
    assert probe.stats() == {}  # no forward recorded, no gradients yet

    probe.enabled = True
    with torch.no_grad():
        model(x)
    recorded = probe.stats()
    twin = copy.deepcopy(model)  # carries the hooks, as timm's ModelEmaV3 would
    with torch.no_grad():
        twin(x * 3.0)
    assert probe.stats() == recorded  # the copy's forward does not overwrite the records
    probe.close()


# ---------------------------------------------------------------- GPAS together with PGT

def test_gpas_and_pgt_give_both_closed_forms():
    from powergrad.transform import PowerGradCrossEntropy

    alpha = 0.25
    model = apply_gpas(tiny_vit(init_values=0.5), gate="add")
    set_gates(model)
    model64 = copy.deepcopy(model).double()
    x, y = images(6)

    PowerGradCrossEntropy(alpha)(model(x), y).backward()

    # Float64: the PGT closed form at the logits, backpropagated through the network.
    captured = {}

    def keep_output(module, inputs, output):
        output.retain_grad()
        captured["out"] = output

    # Block 1's output is its MLP gate's output; the last gate is a poor subject, since the
    # final LayerNorm is invariant to its scale and so its gradient is nearly 0.
    handle = model64.blocks[1].register_forward_hook(keep_output)
    logits64 = model64(x.double())
    handle.remove()
    onehot = F.one_hot(y, CLASSES).double()
    logits64.backward((torch.softmax(alpha * logits64.detach(), dim=-1) - onehot) / len(y))

    grads64 = dict(model64.named_parameters())
    gate_names = [n for n, _ in model.named_parameters() if "gpas" in n]
    for name, p in model.named_parameters():
        if name not in gate_names:
            assert_close64(p.grad, grads64[name].grad, rtol=1e-4)
    # A gate's gradient is a dot product over the whole batch, with cancellation: float32
    # rounding is measured against the largest gate gradient, not each one's own size.
    stack = lambda grads, names: torch.stack([grads[n].grad.double() for n in names])
    assert_close64(stack(dict(model.named_parameters()), gate_names),
                   stack(grads64, gate_names), rtol=1e-4)

    # GPAS's closed form for that gate: -silu'(g) <dL/dout, h>, with h = out / (1 - silu(g)).
    gate64 = model64.blocks[1].gpas_mlp
    g = gate64.g.item()
    out = captured["out"]
    h = out.detach() / (1.0 - silu64(g))
    expected = -silu_grad64(g) * (out.grad * h).sum()
    assert abs(expected.item()) > 1e-4  # a gradient worth comparing
    assert_close64(gate64.g.grad, expected, rtol=1e-10)
    assert_close64(model.blocks[1].gpas_mlp.g.grad, expected, rtol=1e-4)
