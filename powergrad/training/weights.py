"""Model weights from a file, whatever layout saved them: this suite's checkpoints (best.pth,
last.pth) and the common release layouts ({'state_dict': ...}, {'model': ...}, EMA copies, a
bare state dict, DDP's 'module.' prefixes, .safetensors), and loading them into a model with
one line saying what does not fit instead of torch's list of every key."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the model; the message names the file."""


def weights_file(source: str | Path, names: tuple[str, ...]) -> Path:
    """The weights file `source` names: the file itself, or in a folder the first of `names`
    it holds (a run folder's best.pth/last.pth, an export's model.safetensors)."""
    source = Path(source)
    if not source.is_dir():
        return source
    for name in names:
        if (source / name).is_file():
            return source / name
    raise WeightsError(f"{source}: a folder with none of {', '.join(names)} (a run folder's "
                       "checkpoints, or an export)")


def read_state_dict(path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in `path`; with ema=True its EMA copy (an error when it has none)."""
    return state_dict_in(read_payload(path), path, ema)


def read_payload(path: str | Path) -> dict:
    """Whatever mapping the weights file at `path` holds (read once; state_dict_in finds
    the weights in it)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            payload = load_file(str(path))
        else:
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, refused pickle, not torch at all: many types
        raise WeightsError(f"{path}: cannot be read ({type(err).__name__}); the file is "
                           "damaged or not a weights file") from None
    if not isinstance(payload, dict):
        raise WeightsError(f"{path}: holds a {type(payload).__name__}, not weights")
    return payload


def state_dict_in(payload: dict, path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in a file's `payload` (read from `path`), in any common layout."""
    from timm.models import clean_state_dict  # strips DDP's 'module.' as timm's loaders do

    # ours: model/ema; timm's train.py: state_dict/state_dict_ema; DeiT, MAE: model/model_ema
    keys = ("ema", "state_dict_ema", "model_ema") if ema else ("model", "state_dict")
    for key in keys:
        if isinstance(payload.get(key), dict):
            return clean_state_dict(payload[key])
    if ema:
        raise WeightsError(f"{path}: holds no EMA weights (none of {', '.join(keys)}); the run "
                           "had train.model_ema: false, so leave out --ema")
    if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return clean_state_dict(payload)  # a bare state dict
    raise WeightsError(f"{path}: no weights found (keys {sorted(payload)[:6]}); expected a "
                       "state dict, or one under 'model' or 'state_dict'")


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path,
                 what: str, check_only: bool = False) -> None:
    """model.load_state_dict(state_dict), or one WeightsError saying how the two differ;
    check_only: the check alone (a model on the meta device, in preflight)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    resized = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
               if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or resized:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(resized)} of another shape (e.g. {resized[0]})" if resized else ""]
        raise WeightsError(f"{path}: its weights do not fit {what}: "
                           + "; ".join(p for p in parts if p))
    if not check_only:
        model.load_state_dict(state_dict)
