"""What every gpu-check row shares: the sizes of the full (GPU) and reduced (CPU) forms, the
row and context types, the synthetic data, the loaders' import checks, and the paper recipe
with the device's overrides."""
from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

PAPER_RECIPE = Path(__file__).resolve().parents[2] / "recipes/imagenet/resnet50_cosine_pgt.yaml"

NO_CUDA = "skipped: no CUDA device"

LOADERS = ("ffcv", "dali", "torchvision")

@dataclass(frozen=True)
class Sizes:
    """How much each row does: the full form on a GPU, the reduced form on the CPU."""
    images: int  # synthetic JPEGs written for the loader and engine rows
    image_px: tuple[int, int]  # their side lengths range
    res: int  # training resolution
    batch: int  # images per loader batch and per engine micro-batch
    warmup: int  # batches before timing starts
    engine_steps: int
    ddp_steps: int
    step_batch: int | None  # gpu-hours: the recipe's micro-batch when None
    step_repeats: int
    workers: int
    # ResNet-50's bottleneck blocks per stage in the DDP engine rows (None: the recipe's
    # 3, 4, 6, 3); one per stage on the CPU, where torch.compile of the whole net takes minutes
    ddp_blocks: tuple[int, ...] | None = None

FULL = Sizes(images=2048, image_px=(300, 500), res=224, batch=64, warmup=4, engine_steps=3,
             ddp_steps=10, step_batch=None, step_repeats=5, workers=min(8, os.cpu_count() or 1))

REDUCED = Sizes(images=20, image_px=(40, 90), res=32, batch=4, warmup=1, engine_steps=2,
                ddp_steps=2, step_batch=2, step_repeats=2, workers=1, ddp_blocks=(1, 1, 1, 1))

@dataclass
class Row:
    name: str
    path: str  # what ran, on which device
    status: str = "pass"  # pass | FAIL | skipped: ...
    numbers: str = ""
    seconds: float = 0.0  # the row's wall time, set-up included

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    workdir: Path
    recipe: Path = PAPER_RECIPE  # the ResNet-50 paper recipe the engine rows train
    feed_ratios: dict = field(default_factory=dict)  # loader name -> measured feed ratio
    # the DDP engine row's uninterrupted run: (epoch 1's train loss, its optimizer steps),
    # which the compile row's same steps, compiled, must reproduce
    eager_epoch_1: tuple[float, int] | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def amp_dtype(self) -> torch.dtype:
        # fp16 runs some 20x slower than bf16 on a CPU: the reduced form uses bf16 there
        return torch.float16 if self.cuda else torch.bfloat16

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

def synthetic_data(ctx: Context) -> Path:
    """A JPEG ImageFolder tree of 10 classes (train, and val with an odd count) and .beton
    files of it as the writer writes them by default; reused when `workdir` already holds
    them."""
    from powergrad.data.ffcv_writer import write_imagefolder_beton
    from powergrad.data.synthetic_images import write_synthetic_image_folder

    train_per_class, val_per_class = ctx.sizes.images // 10, max(1, ctx.sizes.images // 40)
    # One validation image more in the first class: an odd count, which no even number of
    # processes shares evenly, so an evaluation that pads the ranks' shares shows it.
    val_images = 10 * val_per_class + 1
    root = ctx.workdir / f"data_{ctx.sizes.images}_{val_images}val"
    if (root / ".complete").exists():
        return root
    print(f"gpu-check: writing synthetic JPEGs and .beton files to {root}", file=sys.stderr,
          flush=True)
    classes = [f"n{i:08d}" for i in range(10)]
    px = ctx.sizes.image_px
    for split, parts in (("train", [(classes, train_per_class, 0)]),
                         ("val", [(classes[:1], val_per_class + 1, 1),
                                  (classes[1:], val_per_class, 2)])):
        for names, per_class, seed in parts:
            write_synthetic_image_folder(root / split, names, per_class, width_range=px,
                                         height_range=px, seed=seed)
        if skip_reason("ffcv") is None:
            with contextlib.redirect_stderr(io.StringIO()):  # the writer's progress bar
                write_imagefolder_beton(root / split, root / f"{split}.beton",
                                        workers=ctx.sizes.workers, overwrite=True)
    (root / ".complete").touch()
    return root

def images_written(folder: Path) -> int:
    """The JPEGs of an ImageFolder split."""
    return sum(1 for path in folder.glob("*/*.JPEG"))

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

# The loaders' modules and the distributions that install them.
LOADER_MODULES = {"ffcv": ("ffcv.loader", "ffcv"),
                  "dali": ("nvidia.dali.plugin.pytorch", "nvidia-dali"),
                  "torchvision": ("torchvision", "torchvision")}

def skip_reason(loader: str) -> str | None:
    """None when the loader imports, else the row's "skipped: ..." status."""
    module, distribution = LOADER_MODULES[loader]
    try:
        __import__(module)
    except ModuleNotFoundError:
        return f"skipped: {distribution} not installed"
    except Exception as e:  # installed, but a broken native build
        return f"skipped: {distribution} does not import ({type(e).__name__}: {e})"
    return None

def data_overrides(ctx: Context, root: Path, loader: str) -> list[str]:
    return [f"data.train_dir={root / 'train'}", f"data.val_dir={root / 'val'}",
            f"data.train_beton={root / 'train.beton'}", f"data.val_beton={root / 'val.beton'}",
            f"data.loader={loader}", f"data.workers={ctx.sizes.workers}",
            f"data.img_size={ctx.sizes.res}", f"data.val_img_size={ctx.sizes.res}",
            "data.min_res=null", "data.max_res=null", "data.num_classes=10"]

def device_overrides(ctx: Context) -> list[str]:
    dtype = "float16" if ctx.amp_dtype is torch.float16 else "bfloat16"
    threads = [] if ctx.cuda else ["train.threads=1"]
    return [f"train.device={ctx.device.type}", f"train.amp_dtype={dtype}", *threads]

def paper_recipe(ctx: Context, overrides: list[str]):
    from powergrad.config.loading import load_recipe

    return load_recipe(ctx.recipe, [*device_overrides(ctx), *overrides])
