"""Loader throughput at the .beton settings users write, side by side in one run.

    python tools/bench_loader.py --images 1280 --repeats 3 --write results/bench_loader.md

Data: a synthetic ImageNet-like JPEG folder (~300-500 x 250-450 px, quality 90) cached under
--cache (outside git), written three ways to .beton: the writer's default (longest side 500 px,
50 % of the images JPEG at quality 90, as ffcv-imagenet's ResNet-50 files), ffcv-imagenet's
ResNet-18 files (400 px, 10 % JPEG) and all-JPEG (500 px).

Measured, at 160, 192 and 224 px with 1 and 2 workers, each a pass over the data that yields
normalised float32 channels-last batches on the CPU (what a CPU run trains on):
  ffcv ours       powergrad's FfcvTrainLoader, iterated as the engine iterates it;
  ffcv bare       an ffcv Loader written here, the same decoder/flip pipeline, normalised by
                  ffcv's own NormalizeImage in its worker threads (the reference, within 5 %);
  ffcv uint8      the same bare Loader without normalisation: what the CPU supplies when the
                  GPU normalises (training on a GPU), the ceiling for any CPU-side work;
  ffcv ours-uint8 ours before its normalisation: everything ours does in ffcv;
  torchvision     ImageFolder + the same augmentation, decoded with TorchCodec (what the
                  project ships) and with PIL; both normalised by the same torch code as ours;
  dali            powergrad's DaliTrainLoader on the JPEG folder, its CPU decode here (on a
                  GPU the decode is "mixed": nvJPEG); dali read: DALI's file reader alone,
                  the CPU's floor when the GPU decodes;
  limit           the .beton's stored images decoded (ffcv's own libjpeg-turbo call) or, for
                  raw ones, copied, in `workers` processes: decode of the JPEG share plus a copy
                  of the raw share, with no crop, resize or batching.
Repeats run every variant once per (resolution, workers) cell in a rotating order; ratios are
taken within a repeat and reported as median [min-max]. Each pass skips its first two batches
(ffcv's pipeline start, torchvision's worker start-up) and times the rest.

Also reported: the single-core cost of each stage (where the time goes), the cores per GPU that
the measured rates imply, and the page-cache memory full ImageNet needs, from ffcv's own
scheduling code run on ImageNet's sample count and published file sizes.

Structure: bench_loader_adapters.py (the data, one adapter per loader), bench_loader_timing.py
(steady rates, the decode limit, stage costs, the interleaved repeats), bench_loader_cache.py
(the page-cache arithmetic), bench_loader_report.py (the rows of the tables, the markdown).
Writes a JSON record and renders the markdown from it (tools/bench_record.py); --render
redraws the markdown from a record without measuring:

    python tools/bench_loader.py --render results/bench_loader.json --write results/bench_loader.md
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import bench_loader_report as report
import torch
from bench_loader_adapters import SETTING_NAMES, build_variants, prepare_data
from bench_loader_cache import FFCV_IMAGENET_BATCH, PUBLISHED_BYTES, process_cache_gib
from bench_loader_timing import STAGE_ROUNDS, first_passes, interleaved_rates, stage_costs
from bench_record import add_output_arguments, new_record, run

from powergrad.data.imagenet_archives import IMAGENET

TOOL, TOOL_PATH = "bench_loader", "tools/bench_loader.py"


def page_cache_memory() -> dict[str, tuple[float, float]]:
    """{setting: (QUASI_RANDOM GiB, RANDOM GiB)} per process for full ImageNet."""
    return {name: tuple(process_cache_gib(IMAGENET.train_images, size / IMAGENET.train_images,
                                          FFCV_IMAGENET_BATCH, quasi_random=quasi)
                        for quasi in (True, False))
            for name, size in PUBLISHED_BYTES.items()}


def measure(args, command: str) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # the main thread only normalises; more threads fight the workers
    record = new_record(TOOL, command, {"images": args.images, "batch_size": args.batch_size,
                                        "repeats": args.repeats, "h100_rate": args.h100_rate,
                                        "stage_rounds": STAGE_ROUNDS}, threads=1)
    args.cache.mkdir(parents=True, exist_ok=True)
    folder, betons = prepare_data(args.cache, args.images)
    print(f"data ready in {time.perf_counter() - t0:.0f} s: {folder}", flush=True)
    variants = build_variants(folder, betons, args.batch_size)
    compile_s = first_passes(variants)
    print(f"ffcv first passes (numba compilation): "
          f"{', '.join(f'{s:.0f}' for s in compile_s.values())} s", flush=True)
    rates, limits = interleaved_rates(variants, betons, args.repeats)
    costs = {name: stage_costs(betons[name], args.batch_size) for name in SETTING_NAMES}
    memory = page_cache_memory()
    record["samples"] = {
        "img_per_s": [{"px": res, "workers": w, "per_repeat": cell}
                      for (res, w), cell in rates.items()],
        "limit_img_per_s": [{"setting": n, "workers": w, "per_repeat": v}
                            for (n, w), v in limits.items()],
        "stage_ms": costs, "first_pass_s": compile_s}
    record["rows"] = report.summarise(rates, limits, costs, memory, args.h100_rate,
                                      IMAGENET.train_images)
    record["facts"] = report.facts(args.images, compile_s,
                                   {n: betons[n].stat().st_size for n in SETTING_NAMES},
                                   time.perf_counter() - t0, args.h100_rate,
                                   IMAGENET.train_images)
    return record


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=1280,
                   help="images in the data set (default 1280)")
    p.add_argument("--batch-size", type=int, default=64, help="(default 64)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    p.add_argument("--h100-rate", type=float, default=6000,
                   help="ResNet-50 img/s an H100 trains at, for the cores-per-GPU table "
                        "(default 6000: an assumption, see the report)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache/powergrad/bench_loader",
                   help="where the synthetic data is kept "
                        "(default ~/.cache/powergrad/bench_loader)")
    add_output_arguments(p)
    args = p.parse_args(argv)
    return run(args, argv, TOOL, TOOL_PATH, measure, report.render)


if __name__ == "__main__":
    main()
