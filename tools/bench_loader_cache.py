"""Page-cache memory an ffcv .beton needs with os_cache=False, from ffcv's own scheduling code.

With os_cache=False each process keeps the file's pages in a cache of its own: ffcv lays the
samples out in pages (8 MiB by default), and its compute_schedule gives a page a slot from
`prefetch_ahead` (3) batches before its first use until the batch after its last use. The slot
count times the page size is the cache's peak. A RANDOM order reads some sample of almost every
page early and another late, so almost every page stays; QUASI_RANDOM (ffcv's order that draws
from a few pages at a time) keeps a handful.
"""
from __future__ import annotations

import numpy as np

PAGE_SIZE = 8 << 20  # ffcv's default page size
# Full ImageNet as ffcv-imagenet's write script stores it (file sizes of public copies named
# train_500_0.50_90.ffcv and train_400_0.10_90.ffcv, huggingface.co/datasets/
# hsgser/imagenet_boomerang_100steps); all-JPEG at 512 px q90: ffcv's docs, 65.47 GB.
PUBLISHED_BYTES = {"default": 543_419_608_424, "rn18": 570_103_770_472, "jpeg": 65.47e9}
PUBLISHED_SOURCE = {"default": "public copy of train_500_0.50_90.ffcv",
                    "rn18": "public copy of train_400_0.10_90.ffcv",
                    "jpeg": "ffcv docs, JPEG q90 at 512 px"}
FFCV_IMAGENET_BATCH = 512  # per GPU, rn50_configs/*.yaml


def page_of_samples(samples: int, bytes_per_sample: float, page_size: int = PAGE_SIZE
                    ) -> np.ndarray:
    """The page each sample lies in, the samples laid out in order at their mean size (at
    least one a page)."""
    per_page = max(1, int(page_size // bytes_per_sample))
    return np.arange(samples) // per_page


def cache_slots(order: np.ndarray, page_of: np.ndarray, batch_size: int) -> int:
    """ffcv's slot count for reading samples in `order`, `batch_size` at a time (drop_last)."""
    from ffcv.memory_managers.process_cache.schedule import compute_schedule

    batches = len(order) // batch_size
    order = np.asarray(order)[:batches * batch_size].reshape(batches, batch_size)
    return compute_schedule([set(page_of[b].tolist()) for b in order]).num_slots


def quasi_random_order(page_of: np.ndarray) -> np.ndarray:
    """ffcv's QUASI_RANDOM order for this layout (its generate_order_inner, seed 0)."""
    from ffcv.traversal_order.quasi_random import generate_order_inner

    sizes = np.bincount(page_of).astype(np.int64)  # samples per page; pages in order
    samples, pages, per_page = len(page_of), len(sizes), int(sizes[0])
    table = np.full((pages, per_page), -1, np.int64)  # the samples of each page, -1 padded
    table.reshape(-1)[:samples] = np.arange(samples)
    order = np.zeros(samples, np.int64)
    generate_order_inner(0, table, sizes, order)
    return order


def process_cache_gib(samples: int, bytes_per_sample: float, batch_size: int,
                      quasi_random: bool, page_size: int = PAGE_SIZE) -> float:
    """GiB one process's ffcv page cache peaks at over one epoch with os_cache=False."""
    page_of = page_of_samples(samples, bytes_per_sample, page_size)
    if quasi_random:
        order = quasi_random_order(page_of)
    else:
        order = np.random.default_rng(0).permutation(samples)
    return cache_slots(order, page_of, batch_size) * page_size / 2**30
