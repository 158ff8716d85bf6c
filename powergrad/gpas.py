"""GPAS, from "GPAS: Accelerating Convergence of LLM Pretraining via Gradient-Preserving
Activation Scaling" (arXiv 2506.22049), for timm's vision transformers (ViT, DeiT).

After a residual add h = x + F(x), GPAS outputs h - silu(g) * stop_gradient(h): the forward
value is (1 - silu(g)) h, which keeps the residual stream's variance from growing with depth,
while the gradient with respect to h passes through unchanged. g is a learnable scalar,
initialised to 0 (so the network starts as the ungated one).

`apply_gpas` rewrites the blocks of a timm VisionTransformer in place into one of four
residual layouts, each with or without GPAS (without it gives the fair baseline):

    pre       x = gate(x + F(norm(x)))                    timm's own pre-LN block
    sandwich  x = gate(x + F_out_norm(F(norm(x))))        an extra norm on each sublayer output
    deepnorm  x = norm(alpha * gate(x) + F(x))            post-LN, alpha = (2N)^(1/4)
    lns       pre, with norm weights initialised to 1/sqrt(block index + 1)

DeepNet's scaled initialisation goes to the ungated deepnorm baseline; with GPAS on, the model
keeps timm's initialisation unless deepnorm_scaled_init="always". That default follows the
official GPAS code (github.com/dandingsky/GPAS, peft_pretraining/modeling_llama.py), which
marks layers for the scaled init only when NORM_TYPE is 'deeppost', not 'deeppost_gpas'.

F includes timm's layer scale and drop path. The block keeps its submodules and their names, so
the original state_dict keys stay valid; the gates (and sandwich's extra norms) add keys.

`ResidualStreamProbe` records per-block residual-stream variance, gradient norms and gate
values as a flat dict of scalars for logging; it works on models without GPAS too.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

__all__ = ["ResidualGate", "GPASBlock", "apply_gpas", "gpas_gates", "ResidualStreamProbe",
           "VARIANTS", "GATE_MODES", "DEEPNORM_SCALED_INITS"]

VARIANTS = ("pre", "sandwich", "deepnorm", "lns")
GATE_MODES = (None, "block", "add")  # None: the variant without GPAS
DEEPNORM_SCALED_INITS = ("baseline", "always")  # which deepnorm models get DeepNet's init


class ResidualGate(nn.Module):
    """h -> h - silu(g) * stop_gradient(h).

    Forward value (1 - silu(g)) h; gradient wrt h: the identity; wrt g: -silu'(g) <dL/dout, h>.
    stop_gradient=False is the paper's ablation: then the gradient wrt h is (1 - silu(g)) dL/dout.
    A fixed gate (learnable=False) keeps g as a buffer so it is saved and moves with the model.
    """

    def __init__(self, init: float = 0.0, learnable: bool = True, stop_gradient: bool = True,
                 device=None, dtype=None):
        super().__init__()
        g = torch.tensor(float(init), device=device, dtype=dtype)
        if learnable:
            self.g = nn.Parameter(g)
        else:
            self.register_buffer("g", g)
        self.stop_gradient = stop_gradient

    def scale(self) -> torch.Tensor:
        """The forward multiplier 1 - silu(g)."""
        return 1.0 - F.silu(self.g)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # Cast the scalar, not h: under autocast the stream must keep its dtype.
        s = F.silu(self.g).to(h.dtype)
        return h - s * (h.detach() if self.stop_gradient else h)

    def extra_repr(self) -> str:
        return (f"learnable={isinstance(self.g, nn.Parameter)}, "
                f"stop_gradient={self.stop_gradient}")


def _no_gate(h: torch.Tensor) -> torch.Tensor:
    return h


class GPASBlock(Block):
    """timm's ViT Block with one forward for every variant and gate mode.

    Never constructed directly: `apply_gpas` swaps an existing Block's class to this one and adds
    the new modules, so parameters, names, layer scale and drop path all stay the block's own.
    Gates: `gpas` (one per block, used after both adds, as in the official code) or
    `gpas_attn` and `gpas_mlp` (one per add); none when GPAS is off.
    """

    gpas_variant: str
    gpas_gate: Optional[str]
    skip_scale: float  # DeepNorm's alpha; 1 elsewhere

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        gate_attn, gate_mlp = self._gates()

        def attn(y):
            return self.attn(y, attn_mask=attn_mask, is_causal=is_causal)

        x = self._residual(x, attn, self.norm1, self.out_norm1, self.ls1, self.drop_path1,
                           gate_attn)
        x = self._residual(x, self.mlp, self.norm2, self.out_norm2, self.ls2, self.drop_path2,
                           gate_mlp)
        return x

    def _residual(self, x, sublayer: Callable, norm: nn.Module, out_norm: nn.Module,
                  layer_scale: nn.Module, drop_path: nn.Module, gate: Callable) -> torch.Tensor:
        if self.gpas_variant == "deepnorm":
            # Post-LN: the gate acts on the skip branch, before DeepNorm's up-weighting.
            branch = drop_path(layer_scale(sublayer(x)))
            return norm(self.skip_scale * gate(x) + branch)
        # Pre-LN family; out_norm is the sandwich norm, nn.Identity for the other variants.
        branch = drop_path(layer_scale(out_norm(sublayer(norm(x)))))
        return gate(x + branch)

    def _gates(self) -> tuple[Callable, Callable]:
        if self.gpas_gate == "block":
            return self.gpas, self.gpas
        if self.gpas_gate == "add":
            return self.gpas_attn, self.gpas_mlp
        return _no_gate, _no_gate

    def extra_repr(self) -> str:
        return (f"variant={self.gpas_variant}, gate={self.gpas_gate}, "
                f"skip_scale={self.skip_scale:.4g}")


def apply_gpas(model: nn.Module, variant: str = "pre", gate: Optional[str] = "block",
               learnable: bool = True, init: float = 0.0,
               stop_gradient: bool = True,
               deepnorm_scaled_init: str = "baseline") -> nn.Module:
    """Rewrite `model.blocks` (timm ViT/DeiT Blocks) in place; returns the model.

    variant: pre | sandwich | deepnorm | lns (see the module docstring).
    gate: 'block' (one gate per block for both adds, the official choice), 'add' (one per
        residual add) or None (the variant without GPAS, for baselines).
    learnable: False keeps g fixed at `init` (a buffer, no trainable parameter).
    stop_gradient: False only for the paper's ablation (plain scaling of the residual stream).
    deepnorm_scaled_init: 'baseline' (DeepNet's scaled init only when gate is None, as the
        official code does) or 'always' (also under GPAS); other variants ignore it.
    Call it right after creating the model: deepnorm and lns re-initialise some weights.
    """
    if variant not in VARIANTS:
        raise ValueError(f"GPAS variant must be one of {VARIANTS}, got {variant!r}")
    if gate not in GATE_MODES:
        raise ValueError(f"GPAS gate must be one of {GATE_MODES}, got {gate!r}")
    if deepnorm_scaled_init not in DEEPNORM_SCALED_INITS:
        raise ValueError(f"deepnorm_scaled_init must be one of {DEEPNORM_SCALED_INITS}, "
                         f"got {deepnorm_scaled_init!r}")
    scaled_init = gate is None or deepnorm_scaled_init == "always"
    blocks = _vit_blocks(model)
    depth = len(blocks)
    for index, block in enumerate(blocks):
        _convert_block(block, variant, gate, dict(init=init, learnable=learnable,
                                                  stop_gradient=stop_gradient))
        if variant == "deepnorm":
            block.skip_scale = (2.0 * depth) ** 0.25
            if scaled_init:
                _deepnorm_init_(block, beta=(8.0 * depth) ** -0.25)
        if variant == "lns":
            _scale_norm_weights_(block, 1.0 / math.sqrt(index + 1))
    return model


def _vit_blocks(model: nn.Module) -> list[Block]:
    blocks = list(getattr(model, "blocks", None) or [])
    if not blocks:
        raise TypeError(f"GPAS needs a timm VisionTransformer (model.blocks), "
                        f"got {type(model).__name__}")
    for block in blocks:
        if isinstance(block, GPASBlock):
            raise ValueError("apply_gpas was already applied to this model")
        if type(block) is not Block:  # other block types have other layouts
            raise TypeError(f"GPAS supports timm's vision_transformer.Block, "
                            f"got {type(block).__name__}")
    return blocks


def _convert_block(block: Block, variant: str, gate: Optional[str], gate_kwargs: dict) -> None:
    reference = next(block.parameters())
    factory = dict(device=reference.device, dtype=reference.dtype)
    block.__class__ = GPASBlock
    block.gpas_variant, block.gpas_gate, block.skip_scale = variant, gate, 1.0
    block.out_norm1 = _fresh_copy(block.norm1) if variant == "sandwich" else nn.Identity()
    block.out_norm2 = _fresh_copy(block.norm2) if variant == "sandwich" else nn.Identity()
    if gate == "block":
        block.gpas = ResidualGate(**gate_kwargs, **factory)
    elif gate == "add":
        block.gpas_attn = ResidualGate(**gate_kwargs, **factory)
        block.gpas_mlp = ResidualGate(**gate_kwargs, **factory)


def _fresh_copy(norm: nn.Module) -> nn.Module:
    """A new norm of the same kind (type, eps, affine, device), freshly initialised."""
    norm = copy.deepcopy(norm)
    norm.reset_parameters()
    return norm


@torch.no_grad()
def _deepnorm_init_(block: Block, beta: float) -> None:
    """DeepNet's encoder init: xavier-normal, gain beta on the value and output projections and
    every MLP linear; gain 1 on query and key. The fused qkv is initialised as three
    (attn_dim x dim) matrices, as DeepNet's separate projections would be. Biases zero."""
    qkv = getattr(block.attn, "qkv", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(getattr(block.attn, "proj", None),
                                                        nn.Linear):
        raise TypeError("deepnorm needs timm's Attention with a fused qkv and a proj Linear")
    q, k, v = qkv.weight.chunk(3, dim=0)  # views: initialising them writes into qkv.weight
    nn.init.xavier_normal_(q, gain=1.0)
    nn.init.xavier_normal_(k, gain=1.0)
    nn.init.xavier_normal_(v, gain=beta)
    linears = [block.attn.proj] + [m for m in block.mlp.modules() if isinstance(m, nn.Linear)]
    for linear in linears:
        nn.init.xavier_normal_(linear.weight, gain=beta)
    for linear in [qkv] + linears:
        if linear.bias is not None:
            linear.bias.zero_()


@torch.no_grad()
def _scale_norm_weights_(block: Block, value: float) -> None:
    for norm in (block.norm1, block.norm2):
        if getattr(norm, "weight", None) is None:
            raise TypeError("lns needs affine block norms (a weight to initialise)")
        norm.weight.fill_(value)


def gpas_gates(block: nn.Module) -> list[tuple[str, ResidualGate]]:
    """A block's gates with their label suffixes: [('', gate)] or [('_attn', ..), ('_mlp', ..)]."""
    if not isinstance(block, GPASBlock) or block.gpas_gate is None:
        return []
    if block.gpas_gate == "block":
        return [("", block.gpas)]
    return [("_attn", block.gpas_attn), ("_mlp", block.gpas_mlp)]


class ResidualStreamProbe:
    """Per-block diagnostics of a timm ViT, with or without GPAS, as a flat dict of floats.

        probe = ResidualStreamProbe(model)
        loss = criterion(model(x), y); loss.backward()
        writer_scalars = probe.stats()  # {'gpas/var/block00': ..., 'gpas/grad_norm/block00': ...}
        probe.close()

    var: population variance over all elements of each block's output in the latest forward
        (recorded by a forward hook under no_grad on the detached output, kept on the device);
    grad_norm: L2 norm of the current .grad of each block's own weights (gates excluded, so the
        numbers compare like for like with a baseline);
    gate / gate_scale: g and the forward multiplier 1 - silu(g), per block or per add
        (`block03_attn`, `block03_mlp`).
    The probe never changes the computation; set `enabled = False` to stop recording.
    """

    def __init__(self, model: nn.Module, enabled: bool = True, prefix: str = "gpas"):
        blocks = list(getattr(model, "blocks", None) or [])
        if not blocks:
            raise TypeError(f"ResidualStreamProbe needs model.blocks, got {type(model).__name__}")
        self.blocks, self.enabled, self.prefix = blocks, enabled, prefix
        self._variance: list[Optional[torch.Tensor]] = [None] * len(blocks)
        self._handles = [block.register_forward_hook(self._recorder(i))
                         for i, block in enumerate(blocks)]

    def _recorder(self, index: int):
        def record(module, inputs, output):
            # A deepcopy of the model (timm's ModelEmaV3) carries this hook: ignore its blocks.
            if self.enabled and module is self.blocks[index]:
                with torch.no_grad():
                    self._variance[index] = output.detach().float().var(correction=0)
        return record

    def stats(self) -> dict[str, float]:
        names, values = [], []
        for i, block in enumerate(self.blocks):
            label = f"block{i:02d}"
            if self._variance[i] is not None:
                names.append(f"{self.prefix}/var/{label}")
                values.append(self._variance[i])
            grad_norm = _grad_norm(block)
            if grad_norm is not None:
                names.append(f"{self.prefix}/grad_norm/{label}")
                values.append(grad_norm)
            for suffix, gate in gpas_gates(block):
                names += [f"{self.prefix}/gate/{label}{suffix}",
                          f"{self.prefix}/gate_scale/{label}{suffix}"]
                values += [gate.g.detach(), gate.scale().detach()]
        if not values:
            return {}
        # One device-to-host copy for all scalars, not one sync per value.
        device = values[0].device
        flat = torch.stack([v.detach().float().to(device) for v in values]).tolist()
        return dict(zip(names, flat))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "ResidualStreamProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _grad_norm(block: nn.Module) -> Optional[torch.Tensor]:
    gate_params = {id(gate.g) for _, gate in gpas_gates(block)}
    grads = [p.grad.detach().float() for p in block.parameters()
             if p.grad is not None and id(p) not in gate_params]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
