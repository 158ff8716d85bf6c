"""`powergrad export RUN_DIR`: a run's weights as timm-ready files, so they leave the suite.

The output folder holds `model.safetensors` and timm's `config.json` (architecture, model
arguments, preprocessing), the layout timm's `save_for_hf` writes and
`timm.create_model("local-dir:FOLDER", pretrained=True)` reads. That plain timm call builds the
same network only when the recipe used none of the suite's own layers (small stem, BlurPool,
no-BN, GPAS); the export finds out by building it and comparing outputs on a batch. Otherwise
config.json also carries the recipe's model section under "powergrad", and
`load_exported(FOLDER)` (timm plus this package) rebuilds the network.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from powergrad.config.loading import RecipeError, load_recipe
from powergrad.config.schema import ModelConfig, Recipe
from powergrad.training.checkpoint import umask_mode

FILES = ("model.safetensors", "config.json")


class ExportError(Exception):
    """A run folder or checkpoint that cannot be exported, with what to do."""


def export_run(run_dir: str | Path, out: str | Path | None = None, checkpoint: str = "best",
               ema: bool = False, overwrite: bool = False) -> dict:
    """Write OUT/model.safetensors and OUT/config.json; returns {out, plain_timm, weights}."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / ("export_ema" if ema else "export")
    recipe = _run_recipe(run_dir)
    state_dict = _weights(run_dir / f"{checkpoint}.pth", recipe, ema)
    existing = [out / name for name in FILES if (out / name).exists()]
    if existing and not overwrite:
        raise ExportError(f"{existing[0]}: already exists; pass --overwrite to replace it")

    from powergrad.training.models import build_model
    from powergrad.training.weights import WeightsError, load_weights
    model = build_model(recipe.model).eval()
    try:
        load_weights(model, state_dict, run_dir / f"{checkpoint}.pth",
                     f"the recipe's {recipe.model.model}")
    except WeightsError as err:
        raise ExportError(str(err)) from None
    plain = _plain_timm_twin(recipe.model, model)
    out.mkdir(parents=True, exist_ok=True)
    import timm.models

    described = plain if plain is not None else _timm_base(recipe.model)
    extra = {} if plain is not None else {"powergrad": {
        "model": _plain(recipe.model), "why": _suite_layers(recipe.model),
        "load_with": f"powergrad.commands.export.load_exported({str(out)!r})"}}
    timm.models.save_for_hf(described, str(out), model_config=extra, safe_serialization=True,
                            data_config=_data_config(recipe))
    _note_provenance(out / "config.json", run_dir, recipe, checkpoint, ema)
    if plain is None:  # save_for_hf wrote timm's base model: replace its weights by ours
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(out / "model.safetensors"))
    for name in FILES:  # safetensors writes 0600; exports are for colleagues to read
        if (out / name).exists():
            os.chmod(out / name, umask_mode())
    return {"out": out, "plain_timm": plain is not None,
            "weights": f"{checkpoint}.pth {'EMA' if ema else 'model'} weights"}


def load_exported(folder: str | Path) -> nn.Module:
    """The exported network in eval mode: timm alone when config.json allows, else timm with
    the suite's layers from the config's "powergrad" section."""
    import timm
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if "powergrad" not in config:
        return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    from powergrad.config.schema import GPASConfig
    from powergrad.training.models import build_model

    fields = dict(config["powergrad"]["model"])
    gpas = GPASConfig(**fields.pop("gpas"))
    model = build_model(ModelConfig(**fields, gpas=gpas))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


# --- helpers -------------------------------------------------------------------------------

def _run_recipe(run_dir: Path) -> Recipe:
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise ExportError(f"{run_dir}: no recipe.yaml (name a run folder, "
                          "runs/<output>/<experiment>, of a run that started)")
    try:
        return load_recipe(recipe_file)
    except RecipeError as err:
        raise ExportError(f"{err}") from None


def _weights(path: Path, recipe: Recipe, ema: bool) -> dict:
    from powergrad.training.weights import WeightsError, read_payload, state_dict_in

    if not path.is_file():
        hint = (" (a run writes best.pth after its first epoch; try --checkpoint last)"
                if path.name == "best.pth" else "")
        raise ExportError(f"{path}: no such checkpoint{hint}")
    try:
        payload = read_payload(path)  # read once: its digest, then its weights
        digest = payload.get("recipe_digest")
        if digest and digest != recipe.digest():
            raise ExportError(f"{path}: trained with recipe digest {digest}, but recipe.yaml "
                              f"beside it has {recipe.digest()}: the folder mixes two runs")
        return state_dict_in(payload, path, ema=ema)
    except WeightsError as err:
        raise ExportError(str(err)) from None


def _create_kwargs(cfg: ModelConfig) -> dict:
    """timm.create_model's keyword arguments that a JSON config can carry."""
    return dict(num_classes=cfg.num_classes, in_chans=cfg.in_chans, drop_rate=cfg.drop_rate,
                drop_path_rate=cfg.drop_path, **cfg.kwargs)


def _timm_base(cfg: ModelConfig) -> nn.Module:
    import timm
    return timm.create_model(cfg.model, pretrained=False, **_create_kwargs(cfg)).eval()


def _plain_timm_twin(cfg: ModelConfig, model: nn.Module) -> nn.Module | None:
    """timm's own model for these settings holding the trained weights, if it computes the
    same outputs as the suite's model (checked on one batch); else None."""
    twin = _timm_base(cfg)
    if repr(twin) != repr(model):  # another module structure: the suite changed the network
        return None
    twin.load_state_dict(model.state_dict())
    size = _data_config_size(cfg, model)
    batch = torch.randn(2, cfg.in_chans, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = torch.equal(twin(batch), model(batch))
    return twin if same else None


def _data_config_size(cfg: ModelConfig, model: nn.Module) -> tuple[int, int]:
    size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[1:]
    img = cfg.kwargs.get("img_size")
    if img is not None:
        size = (img, img) if isinstance(img, int) else tuple(img)
    return tuple(size)


def _data_config(recipe: Recipe) -> dict:
    """The evaluation preprocessing the run used, in timm's data-config keys."""
    data, chans = recipe.data, recipe.model.in_chans
    if data.dataset == "fashion_mnist":
        from powergrad.data.fashion_mnist import MEAN, STD
        return {"input_size": (chans, 28, 28), "mean": (MEAN,) * chans, "std": (STD,) * chans,
                "crop_pct": 1.0}
    res = data.val_img_size or data.img_size
    return {"input_size": (chans, res, res), "mean": tuple(data.mean), "std": tuple(data.std),
            "crop_pct": data.crop_pct, "interpolation": "bilinear"}


# pretrained_cfg keys that describe timm's own published weights, not these
_SOURCE_KEYS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes", "hf_hub_id",
                "url", "description")


def _note_provenance(config_path: Path, run_dir: Path, recipe: Recipe, checkpoint: str,
                     ema: bool) -> None:
    config = json.loads(config_path.read_text())
    for key in _SOURCE_KEYS:
        config["pretrained_cfg"].pop(key, None)
    config["trained_by_powergrad"] = {"run": str(run_dir), "recipe_digest": recipe.digest(),
                                      "checkpoint": f"{checkpoint}.pth",
                                      "weights": "ema" if ema else "model"}
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _suite_layers(cfg: ModelConfig) -> list[str]:
    """The recipe's settings that plain timm cannot build (for the config's note)."""
    layers = []
    if cfg.stem != "default":
        layers.append(f"stem: {cfg.stem} (3x3 conv at stride {cfg.stem_stride}, no max-pool)")
    if cfg.norm == "none":
        layers.append("norm: none (norm_layer=nn.Identity)")
    if cfg.blurpool:
        layers.append("blurpool: true")
    if cfg.gpas.enabled or cfg.gpas.variant != "pre":
        layers.append(f"gpas: variant {cfg.gpas.variant}, enabled {cfg.gpas.enabled}")
    return layers or ["a module structure that differs from timm's"]


def _plain(cfg: ModelConfig) -> dict:
    import dataclasses
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples to lists


def main(run_dir: str, checkpoint: str = "best", ema: bool = False, out: str | None = None,
         overwrite: bool = False) -> int:
    try:
        done = export_run(run_dir, out=out, checkpoint=checkpoint, ema=ema, overwrite=overwrite)
    except ExportError as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    folder = done["out"]
    print(f"wrote {folder / 'model.safetensors'} and {folder / 'config.json'} "
          f"({done['weights']})")
    if done["plain_timm"]:
        print(f"load with plain timm: timm.create_model('local-dir:{folder}', pretrained=True)")
    else:
        print("this network uses the suite's own layers; load it with timm and powergrad:\n"
              f"  from powergrad.commands.export import load_exported; "
              f"model = load_exported('{folder}')")
    return 0
