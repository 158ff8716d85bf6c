"""`powergrad check-data DIR|BETON ...`: open every image before a long job, in parallel, and
list every bad file, so damaged data is found in minutes, not in hour three of training.

An ImageFolder tree is checked for its structure (class folders, no stray files, no empty
classes: the rules preflight applies) and then every image: PIL reads its header and size and
walks its structure (`verify`), and a JPEG must end with its end-of-image marker (PIL's verify
does not read a JPEG's entropy-coded data, so a file cut short passes it). A .beton is checked
as a loader checks it: ffcv's header and allocation table against the file size, and the
sidecar (the writer decoded every image when it wrote the file).
"""
from __future__ import annotations

import functools
import time
from multiprocessing import get_context
from pathlib import Path

from powergrad.data.imagefolder_checks import ImageDataError, image_problem, scan_image_folder

_CHUNK = 64  # images per task handed to a worker: few round trips, a smooth progress bar


def _problems_in(paths: list[str], decode: bool = False) -> list[tuple[str, str]]:
    return [(p, why) for p in paths if (why := image_problem(p, decode)) is not None]


def find_bad_images(paths: list[str], workers: int, progress=None,
                    decode: bool = False) -> list[tuple[str, str]]:
    """(path, why) for every unreadable image among `paths`, checked by `workers` processes
    (0: in this one); progress.update is called once per checked chunk with its size.
    decode: decode every pixel as well (image_problem)."""
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    workers = min(workers, len(chunks))  # no idle processes for a small folder
    bad: list[tuple[str, str]] = []
    if workers == 0:
        results = map(functools.partial(_problems_in, decode=decode), chunks)
        pool = None
    else:  # fork: check-data runs no torch op before this, so no thread pool is copied
        pool = get_context("fork").Pool(workers)
        results = pool.imap(functools.partial(_problems_in, decode=decode), chunks)
    try:
        for chunk, found in zip(chunks, results):
            bad.extend(found)
            if progress is not None:
                progress.update(len(chunk))
    finally:
        if pool is not None:
            pool.terminate()
    return bad


def check_path(path: str, workers: int, say=print, decode: bool = False) -> list[str]:
    """Check one ImageFolder tree or .beton file; return one line per problem found."""
    target = Path(path).expanduser()
    if target.is_file():
        from powergrad.data.beton_meta import read_beton_info

        if target.suffix != ".beton":
            return [f"{path}: not a .beton file nor an ImageFolder directory"]
        try:
            info = read_beton_info(target, num_classes=None)
        except ImageDataError as err:
            return [" ".join(str(err).split())]
        say(f"{path}: .beton sound: {info.num_samples} samples, {info.num_classes} classes "
            "(layout and sidecar checked; its images were decoded when it was written)")
        return []
    structure: list[str] = []  # stray files, empty classes: every one, not the first
    try:
        classes, samples = scan_image_folder(target, problems=structure)
    except ImageDataError as err:  # no folder, no class folders
        return [str(err)]
    files = [p for p, _ in samples]
    from powergrad.system.progress import Progress

    start = time.perf_counter()
    bar = Progress(len(files), f"check-data {path}", unit="img", every=max(1, len(files) // 20))
    bad = find_bad_images(files, workers, bar, decode=decode)
    bar.close({})
    seconds = time.perf_counter() - start
    rate = len(files) / seconds if seconds > 0 else 0.0
    lines = structure + [f"{p}: {why}" for p, why in bad]
    say(f"{path}: {len(files)} images in {len(classes)} classes checked in {seconds:.1f} s "
        f"({rate:.0f} img/s, {min(workers, len(files)) or 1} process(es)): "
        f"{len(lines)} problem(s)")
    return lines


def main(paths: list[str], workers: int | None = None, decode: bool = False) -> int:
    """Exit 0 when every path is sound, else 2 after listing every problem (one per line).
    workers: processes that open images (default and most: one per usable core)."""
    from powergrad.training.machine_fit import usable_cores

    workers = usable_cores() if workers is None else min(workers, usable_cores())
    problems = []
    for path in paths:
        problems += check_path(path, workers, decode=decode)
    for line in problems:
        print(f"bad: {line}")
    if problems:
        print(f"check-data: {len(problems)} problem(s); fix or remove those files, or train "
              "past unreadable images with data.bad_images=skip")
        return 2
    return 0
