"""tools/bench_loader.py's measurements: a loader's steady images/s over one pass, the decode
limit of a .beton, the one-core cost of each ffcv stage, and the interleaved repeats that put
every variant of a (resolution, workers) cell side by side."""
from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import torch
from bench_loader_adapters import (MEAN, RESOLUTIONS, SETTING_NAMES, STD, WORKER_COUNTS, in_cell,
                                   stored_samples)
from bench_timing import Spread, seconds, side_by_side

from powergrad.data.device_batches import ImageBatches

SKIP_BATCHES = 2
STAGE_ROUNDS = 5  # stage costs: best of this many


def steady_rate(variant, res: int, workers: int) -> float:
    """Images/s over one pass, from the arrival of batch SKIP_BATCHES - 1 to the last."""
    variant.prepare(res, workers)
    count, start = 0, None
    for i, (images, _) in enumerate(variant):
        if i == SKIP_BATCHES - 1:
            start = time.perf_counter()
        elif i >= SKIP_BATCHES:
            count += images.shape[0]
    if start is None or count == 0:
        raise SystemExit(f"--images too small: fewer than {SKIP_BATCHES + 1} batches a pass")
    return count / (time.perf_counter() - start)


# --- the limit: decode of the JPEG share plus a copy of the raw share -----------------------

_STORED = None


def _open_stored(beton: str) -> None:
    global _STORED
    _STORED = stored_samples(Path(beton))


def _decode_or_copy(indices: list[int]) -> int:
    from ffcv.libffcv import imdecode

    data, fields, sizes = _STORED
    for i in indices:
        mode, width, height, ptr = (int(v) for v in fields[i])
        stored = np.asarray(data[ptr:ptr + sizes[ptr]])
        out = np.empty((height, width, 3), np.uint8)
        if mode == 0:  # ffcv's IMAGE_MODES: 0 = jpg, 1 = raw
            imdecode(stored, out, height, width, height, width, 0, 0, 1, 1, False, False)
        else:
            np.copyto(out.reshape(-1), stored)
    return len(indices)


def limit_rate(beton: Path, workers: int) -> float:
    """Stored images/s: JPEGs decoded at full size, raw pixels copied, `workers` processes."""
    n = len(stored_samples(beton)[1])
    chunks = [list(range(i, min(i + 16, n))) for i in range(0, n, 16)]
    with mp.get_context("fork").Pool(workers, _open_stored, (str(beton),)) as pool:
        pool.map(_decode_or_copy, chunks[:workers])  # start-up outside the timing
        return n / seconds(lambda: pool.map(_decode_or_copy, chunks, chunksize=1))


def stage_costs(beton: Path, batch_size: int, rounds: int = STAGE_ROUNDS) -> dict:
    """Milliseconds per image of each stage of the ffcv pipeline on one core: JPEG decode, raw
    read, random crop + resize at each resolution (ffcv's own C calls), the hand-off of a batch
    to torch (ToTensor/ToTorchImage are views) and ours normalisation, per image."""
    from ffcv.fields.rgb_image import get_random_crop
    from ffcv.libffcv import imdecode, resize_crop

    data, fields, sizes = stored_samples(beton)
    jpeg = [i for i in range(len(fields)) if fields[i]["mode"] == 0][:64]
    raw = [i for i in range(len(fields)) if fields[i]["mode"] == 1][:64]
    decoded = {}

    def best_of(fn, per) -> float:
        return Spread.of([seconds(fn) for _ in range(rounds)]).low / per * 1000

    def decode_all():
        for i in jpeg:
            mode, w, h, ptr = (int(v) for v in fields[i])
            out = np.empty((h, w, 3), np.uint8)
            imdecode(np.asarray(data[ptr:ptr + sizes[ptr]]), out, h, w, h, w, 0, 0, 1, 1,
                     False, False)
            decoded[i] = out

    costs = {"jpeg_share": len(jpeg) / max(1, len(jpeg) + len(raw))}
    costs["decode"] = best_of(decode_all, len(jpeg)) if jpeg else 0.0
    for i in raw:
        mode, w, h, ptr = (int(v) for v in fields[i])
        decoded[i] = np.asarray(data[ptr:ptr + sizes[ptr]]).reshape(h, w, 3)  # read in place
    sources = list(decoded.values())
    np.random.seed(0)  # ffcv's crop draws use numpy's global generator
    crops = [get_random_crop(s.shape[0], s.shape[1], (0.08, 1.0), (3 / 4, 4 / 3))
             for s in sources]
    for res in RESOLUTIONS:
        dst = np.empty((res, res, 3), np.uint8)

        def crop_resize():
            for src, (r, c, h, w) in zip(sources, crops):
                resize_crop(src, r, r + h, c, c + w, dst)
        costs[f"resize_{res}"] = best_of(crop_resize, len(sources))
        buffer = np.random.default_rng(1).integers(0, 256, (batch_size, res, res, 3), np.uint8)
        labels = torch.zeros(batch_size, dtype=torch.int32)
        to_torch = lambda: torch.from_numpy(buffer).permute(0, 3, 1, 2)  # noqa: E731
        costs[f"handoff_{res}"] = best_of(to_torch, 1) * 1000  # microseconds per batch
        batches = ImageBatches([], device="cpu", mean=MEAN, std=STD, channels_last=True,
                               class_names=[])
        costs[f"normalise_{res}"] = best_of(
            lambda: batches.to_model_input(to_torch(), labels), batch_size)
    return costs


def first_passes(variants: dict) -> dict[str, float]:
    """Seconds of each ffcv Loader's first pass (numba compiles its pipeline), untimed after."""
    return {key: seconds(lambda v=variant: steady_rate(v, RESOLUTIONS[0], 2))
            for key, variant in variants.items()
            if key.startswith("ffcv") and "ours-uint8" not in key}


def interleaved_rates(variants: dict, betons: dict[str, Path], repeats: int) -> tuple[dict, dict]:
    """({(px, workers): {variant: [img/s per repeat]}}, {(setting, workers): [limit img/s per
    repeat]}). Each repeat runs every variant of each cell once, each cell's round starting
    one variant later than the last repeat's, then the limits."""
    rates: dict[tuple, dict[str, list[float]]] = {}
    limits: dict[tuple, list[float]] = {}
    for repeat in range(repeats):
        for res in RESOLUTIONS:
            for w in WORKER_COUNTS:
                cases = {key: (lambda v=variant: steady_rate(v, res, w))
                         for key, variant in variants.items() if in_cell(key, w)}
                cell = side_by_side(cases, 1, first_round=repeat,
                                    into=rates.setdefault((res, w), {}))
                print(f"repeat {repeat} {res} px w{w}: "
                      + ", ".join(f"{k} {v[-1]:.0f}" for k, v in cell.items()), flush=True)
        for name in SETTING_NAMES:
            for w in WORKER_COUNTS:
                limits.setdefault((name, w), []).append(limit_rate(betons[name], w))
        print(f"repeat {repeat} limits: " + ", ".join(
            f"{n} w{w} {v[-1]:.0f}" for (n, w), v in limits.items()), flush=True)
    return rates, limits
