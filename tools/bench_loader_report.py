"""tools/bench_loader.py's report: `summarise` turns the measured samples into the rows of its
tables (every number a table shows), `render` turns a record into markdown. Sentences that
judge are computed from the rows (counts of cells, a goal met or not); explanations that do not
follow from the numbers belong in the notes written by hand beside the generated part."""
from __future__ import annotations

from bench_loader_adapters import RESOLUTIONS, SETTINGS, TORCHVISION_DECODER, WORKER_COUNTS
from bench_loader_cache import FFCV_IMAGENET_BATCH, PUBLISHED_BYTES, PUBLISHED_SOURCE
from bench_timing import Spread


# Throughput a loader must feed per GPU for ResNet-50. A100: ffcv-imagenet's 88-epoch run,
# 1,281,167 x 88 images in 77.2 min on 8 A100s (its README), ~3,000 img/s per GPU.
A100_RN50 = 3000
SAME_AS_BARE = 0.95  # ours within 5 % of the bare ffcv Loader
CORES_GOAL = 8  # at most this many cores per A100 at the default setting, 160-192 px


def _ratio(num: list[float], den: list[float]) -> dict:
    return Spread.of_ratios(num, den).to_json()


def _median(values: list[float]) -> float:
    return Spread.of(values).median


def summarise(rates: dict, limits: dict, costs: dict, memory: dict, h100_rate: float,
              imagenet_train: int) -> dict:
    """The tables' rows from {(px, workers): {variant: [img/s per repeat]}}, {(setting,
    workers): [limit img/s]}, {setting: stage ms} and {setting: (quasi GiB, random GiB)}."""
    rows = {name: [] for name in ("ffcv", "torchvision", "dali", "stages", "cores",
                                  "page_cache")}
    for name, _, _ in SETTINGS:
        for res in RESOLUTIONS:
            for w in WORKER_COUNTS:
                cell = rates[(res, w)]
                ours = cell[f"ffcv ours {name}"]
                tv = max(cell[f"torchvision codec w{w}"], cell[f"torchvision PIL w{w}"],
                         key=_median)
                rows["ffcv"].append({
                    "setting": name, "px": res, "workers": w,
                    "ours_img_per_s": Spread.of(ours).to_json(),
                    "ours_img_per_s_per_core": _median(ours) / w,
                    "vs_torchvision": _ratio(ours, tv),
                    "vs_limit": _ratio(ours, limits[(name, w)]),
                    "vs_bare": _ratio(ours, cell[f"ffcv bare {name}"]),
                    "uint8_vs_uint8": _ratio(cell[f"ffcv ours-uint8 {name}"],
                                             cell[f"ffcv uint8 {name}"])})
    for res in RESOLUTIONS:
        for w in WORKER_COUNTS:
            cell = rates[(res, w)]
            codec, pil = cell[f"torchvision codec w{w}"], cell[f"torchvision PIL w{w}"]
            rows["torchvision"].append({
                "px": res, "workers": w, "codec_img_per_s": Spread.of(codec).to_json(),
                "pil_img_per_s": Spread.of(pil).to_json(), "codec_vs_pil": _ratio(codec, pil)})
            dali, read = cell[f"dali w{w}"], _median(cell[f"dali read w{w}"]) / w
            rows["dali"].append({
                "px": res, "workers": w, "dali_img_per_s": Spread.of(dali).to_json(),
                "dali_img_per_s_per_core": _median(dali) / w,
                "vs_torchvision_codec": _ratio(dali, codec),
                "vs_ffcv_ours_jpeg": _ratio(dali, cell["ffcv ours jpeg"]),
                "read_img_per_s_per_core": read, "cores_per_a100_floor": A100_RN50 / read,
                "cores_per_h100_floor": h100_rate / read})
    for name, _, _ in SETTINGS:
        c = costs[name]
        for res in RESOLUTIONS:
            dec = c["decode"] * c["jpeg_share"]
            rows["stages"].append({
                "setting": name, "px": res, "decode_x_share_ms": dec,
                "crop_resize_ms": c[f"resize_{res}"],
                "workers_sum_ms": dec + c[f"resize_{res}"],
                "measured_1_worker_ms": 1000 / _median(rates[(res, 1)][f"ffcv ours-uint8 {name}"]),
                "normalise_ms": c[f"normalise_{res}"], "handoff_us_per_batch": c[f"handoff_{res}"]})
        for res in RESOLUTIONS:
            per_core = _median(rates[(res, 2)][f"ffcv uint8 {name}"]) / 2
            rows["cores"].append({
                "setting": name, "px": res, "gpu_path_img_per_s_per_core": per_core,
                "cores_per_a100": A100_RN50 / per_core, "cores_per_h100": h100_rate / per_core,
                "ours_img_per_s_per_core": _median(rates[(res, 2)][f"ffcv ours {name}"]) / 2})
    for name, _, _ in SETTINGS:
        size, (quasi, rand) = PUBLISHED_BYTES[name], memory[name]
        rows["page_cache"].append({
            "setting": name, "file_gb": size / 1e9, "source": PUBLISHED_SOURCE[name],
            "per_sample_kb": size / imagenet_train / 1e3, "os_cache_gib": size / 2**30,
            "quasi_random_gib": quasi, "random_gib": rand})
    rows["limits"] = [{"setting": n, "workers": w, "img_per_s": Spread.of(v).to_json()}
                      for (n, w), v in limits.items()]
    return rows


def _cells_at_least(rows: list[dict], column: str, bound: float) -> dict[int, int]:
    """Per worker count, the cells whose median `column` is at least `bound`."""
    return {w: sum(r[column]["median"] >= bound for r in rows if r["workers"] == w)
            for w in WORKER_COUNTS}


def verdict(rows: list[dict]) -> str:
    cells = len(rows) // len(WORKER_COUNTS)

    def counts(hits: dict[int, int]) -> str:
        return ", ".join(f"{hits[w]} of {cells} with {w} worker{'s' * (w > 1)}"
                         for w in WORKER_COUNTS)
    return (f"**Ours within 5 % of the bare ffcv Loader** (median ratio >= {SAME_AS_BARE}): "
            f"same output (normalised float32 on this CPU) in "
            f"{counts(_cells_at_least(rows, 'vs_bare', SAME_AS_BARE))}; before normalisation "
            f"(uint8, the CPU's work on a GPU machine) in "
            f"{counts(_cells_at_least(rows, 'uint8_vs_uint8', SAME_AS_BARE))}.")


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _text(spread: dict) -> str:
    return Spread(**spread).text()


def render(record: dict) -> str:
    m, p, f, rows = record["machine"], record["params"], record["facts"], record["rows"]
    dec = f["torchvision_decoder"]
    first = f["first_pass_s"]
    lines = [
        "# Loader throughput at the settings users write", "",
        f"Command: `{record['command']}`", "",
        f"Machine: {m['arch']}, {m['cores']} cores, {m['platform']}"
        + (f"; measured {record['date']}" if record.get("date") else "") + ". Every variant "
        "ran once per (resolution, workers) cell in each repeat, in a rotating order, and "
        "ratios are medians of per-repeat ratios [min-max].",
        f"Data: {p['images']} synthetic JPEGs (~300-500 x 250-450 px, quality 90), batch "
        f"{p['batch_size']}, RandomResizedCrop(0.08-1, 3/4-4/3) + flip; every variant yields "
        "normalised float32 channels-last batches except `ffcv uint8`, `ffcv ours-uint8` and "
        f"`dali read`. Total time {f['total_min']:.1f} min; ffcv's first pass of each Loader "
        f"(numba compilation) {first['min']:.0f}-{first['max']:.0f} s.", "",
        "Settings: " + "; ".join(f"`{n}` = {d} ({f['stored_kb_per_image'][n]:.0f} kB stored "
                                 "per image here)" for n, _, d in SETTINGS) + ".", "",
        "## ffcv at each setting", "",
        "img/s/core = img/s / workers. vs torchvision: over the faster torchvision variant in "
        "the same cell. vs limit: over decode-of-the-JPEG-share + copy-of-the-raw-share in "
        "`workers` processes. vs bare: ours over the bare ffcv Loader with the same output, "
        f"normalised by ffcv in its workers (target >= {SAME_AS_BARE}). uint8 vs uint8: ours "
        "before its normalisation over the bare Loader's uint8 batches (the CPU's work on a "
        "GPU machine).", "",
        "| setting | px | workers | ours img/s | img/s/core | vs torchvision | vs limit "
        "| vs bare | uint8 vs uint8 |",
        "|---|---|---|---|---|---|---|---|---|",
        *(_row(r["setting"], r["px"], r["workers"], f"{r['ours_img_per_s']['median']:.0f}",
               f"{r['ours_img_per_s_per_core']:.0f}", _text(r["vs_torchvision"]),
               _text(r["vs_limit"]), _text(r["vs_bare"]), _text(r["uint8_vs_uint8"]))
          for r in rows["ffcv"]),
        "",
        "Limit (img/s, median): " + "; ".join(
            f"{r['setting']} w{r['workers']} {r['img_per_s']['median']:.0f}"
            for r in rows["limits"]) + ".",
        "", verdict(rows["ffcv"]), "",
        f"## torchvision: {dec} vs PIL decode", "",
        f"| px | workers | {dec} img/s | PIL img/s | {dec} / PIL |",
        "|---|---|---|---|---|",
        *(_row(r["px"], r["workers"], f"{r['codec_img_per_s']['median']:.0f}",
               f"{r['pil_img_per_s']['median']:.0f}", _text(r["codec_vs_pil"]))
          for r in rows["torchvision"]),
        "",
        f"{dec} ahead of PIL in {sum(r['codec_vs_pil']['median'] > 1 for r in rows['torchvision'])}"
        f" of {len(rows['torchvision'])} cells.",
        "", "## DALI on the original JPEGs", "",
        "The paper's own input pipeline (its official code): DALI reads the JPEG folder and "
        "decodes, crops, resizes, flips and normalises. Here the decode runs on the CPU; on a "
        "GPU it is `mixed` (nvJPEG; A100/H100 add a hardware JPEG decoder), and what stays on "
        "the CPU is reading the files (`dali read`: the reader alone) plus the host side of "
        "nvJPEG (parsing; for the hybrid backend also the Huffman decode of small images), "
        "which this benchmark does not measure. Cores per GPU below are therefore a floor: GPU "
        "rate / (`dali read` img/s per core).", "",
        f"| px | workers | dali img/s | img/s/core | vs {dec} | vs ffcv ours, jpeg "
        "| dali read img/s/core | cores per A100, floor | cores per H100, floor |",
        "|---|---|---|---|---|---|---|---|---|",
        *(_row(r["px"], r["workers"], f"{r['dali_img_per_s']['median']:.0f}",
               f"{r['dali_img_per_s_per_core']:.0f}", _text(r["vs_torchvision_codec"]),
               _text(r["vs_ffcv_ours_jpeg"]), f"{r['read_img_per_s_per_core']:.0f}",
               f"{r['cores_per_a100_floor']:.2f}", f"{r['cores_per_h100_floor']:.2f}")
          for r in rows["dali"]),
        "", "## Where the time goes (one core, ms per image)", "",
        f"Stages timed alone on one core (best of {p['stage_rounds']}). In ffcv's worker "
        "threads: the JPEG decode (ffcv's libjpeg-turbo call, weighed by the JPEG share; raw "
        "images are read in place, not copied) and the random crop + resize (ffcv's OpenCV "
        "call). `measured` is 1 / (ours-uint8 img/s with 1 worker): the workers' share, timed "
        "in the pipeline. In the training thread: ours normalisation (a new float32 batch; on "
        "the GPU when training there) and the hand-off to torch (ToTensor/ToTorchImage make "
        "views: microseconds per batch, not per image).", "",
        "| setting | px | decode x share | crop+resize | workers' sum | measured (1 worker) "
        "| normalise | hand-off, us/batch |",
        "|---|---|---|---|---|---|---|---|",
        *(_row(r["setting"], r["px"], f"{r['decode_x_share_ms']:.2f}",
               f"{r['crop_resize_ms']:.2f}", f"{r['workers_sum_ms']:.2f}",
               f"{r['measured_1_worker_ms']:.2f}", f"{r['normalise_ms']:.3f}",
               f"{r['handoff_us_per_batch']:.0f}") for r in rows["stages"]),
        "", "## Cores per GPU (arithmetic)", "",
        "On a GPU the CPU's share of ours is the uint8 pipeline (ffcv's ToDevice copies the "
        "batch, the GPU normalises): the `ffcv uint8` rate with 2 workers / 2 cores is the "
        "per-core rate used; ours with its normalisation on this CPU is shown beside it. "
        f"Cores = GPU rate / per-core rate. A100: {f['a100_rate']} img/s (ffcv-imagenet's "
        f"ResNet-50); H100: {f['h100_rate']:.0f} img/s, an assumption (`--h100-rate`; no "
        "published ffcv-imagenet H100 number) that `tools/gpu_saturation.py` replaces with a "
        "measurement on the machine. ffcv-imagenet trains mostly at 160 px, the last epochs "
        "at 192.", "",
        "| setting | px | img/s/core, GPU path | cores per A100 | cores per H100 "
        "| img/s/core, ours on this CPU |",
        "|---|---|---|---|---|---|",
        *(_row(r["setting"], r["px"], f"{r['gpu_path_img_per_s_per_core']:.0f}",
               f"{r['cores_per_a100']:.1f}", f"{r['cores_per_h100']:.1f}",
               f"{r['ours_img_per_s_per_core']:.0f}") for r in rows["cores"]),
    ]
    worst = max(r["cores_per_a100"] for r in rows["cores"]
                if r["setting"] == "default" and r["px"] in (160, 192))
    lines += [
        "",
        f"Goal, at most {CORES_GOAL} cores per A100 at the default setting (160-192 px): "
        f"{'met' if worst <= CORES_GOAL else 'NOT met'} ({worst:.1f} at most here), on these "
        "synthetic images.",
        "", f"## Page-cache memory for full ImageNet ({f['imagenet_train_images']:,} training "
        "images)", "",
        "os_cache=True (the default, ffcv-imagenet's in_memory=1) keeps the whole file in the "
        "page cache, shared by every process on the node. os_cache=False lets each process "
        "page the file itself; the GiB below is the slot count of ffcv's own compute_schedule "
        f"x 8 MiB pages for batch {f['page_cache_batch']}, QUASI_RANDOM (one process per node "
        "only: ffcv has no distributed QUASI_RANDOM) and RANDOM (what a DDP run gets).", "",
        "| setting | file size (source) | per sample | os_cache=True, per node | "
        "QUASI_RANDOM, per process | RANDOM, per process |",
        "|---|---|---|---|---|---|",
        *(_row(r["setting"], f"{r['file_gb']:.0f} GB ({r['source']})",
               f"{r['per_sample_kb']:.0f} kB", f"{r['os_cache_gib']:.0f} GiB",
               f"{r['quasi_random_gib']:.1f} GiB", f"{r['random_gib']:.1f} GiB")
          for r in rows["page_cache"]),
    ]
    return "\n".join(lines) + "\n"


def facts(images: int, compile_s: dict, stored_bytes: dict, total_s: float,
          h100_rate: float, imagenet_train: int) -> dict:
    """The numbers the report's text shows, beside its tables."""
    return {"torchvision_decoder": TORCHVISION_DECODER,
            "first_pass_s": {"min": min(compile_s.values()), "max": max(compile_s.values())},
            "total_min": total_s / 60,
            "stored_kb_per_image": {n: b / images / 1e3 for n, b in stored_bytes.items()},
            "a100_rate": A100_RN50, "h100_rate": h100_rate,
            "page_cache_batch": FFCV_IMAGENET_BATCH, "imagenet_train_images": imagenet_train}
