"""Where a fine-tuned run's first weights come from: model.initial_checkpoint (a run folder, a
run's .pth, an export folder, a timm state-dict or .safetensors file) or model.pretrained
(timm's released weights, read from the Hugging Face cache: a run never downloads).

A classifier whose shape differs from the checkpoint's (another class count) keeps its fresh
initialisation, as timm's own pretrained loading does; every other tensor must fit exactly.
"""
from __future__ import annotations

import torch.nn as nn

from powergrad.config.schema import ModelConfig
from powergrad.training.weights import load_weights, read_state_dict, weights_file


def classifier_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the model's classifier, by timm's pretrained_cfg name."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ""
    names = [name] if isinstance(name, str) else list(name)
    return [key for key in model.state_dict()
            if any(n and (key == n or key.startswith(f"{n}.")) for n in names)]


def load_initial_checkpoint(model: nn.Module, cfg: ModelConfig,
                            check_only: bool = False) -> list[str]:
    """Load cfg.initial_checkpoint into `model` (check_only: check that it would fit); notes
    on what was left as initialised. WeightsError when it cannot be read or does not fit."""
    path = weights_file(cfg.initial_checkpoint, ("model.safetensors", "best.pth", "last.pth"))
    weights = read_state_dict(path)
    own, notes = model.state_dict(), []
    head = [k for k in classifier_keys(model)
            if k in weights and weights[k].shape != own[k].shape]
    if head:
        shape = tuple(weights[head[0]].shape)
        notes.append(f"model.initial_checkpoint {path}: classifier {', '.join(head)} "
                     f"re-initialised (shape {shape} there, {tuple(own[head[0]].shape)} here: "
                     "another class count)")
        weights = {**weights, **{k: own[k] for k in head}}
    load_weights(model, weights, path, f"{cfg.model} as the recipe builds it", check_only)
    notes.append(f"model.initial_checkpoint: started from {path}")
    return notes


def cached_pretrained_file(name: str) -> str | None:
    """The local file of timm's default pretrained weights for model `name`, or None when
    they are not in the Hugging Face cache."""
    import huggingface_hub
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = huggingface_hub.try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None
