"""The benchmark tools' measuring and rendering, without timing anything that matters: the
shared timing helper (tools/bench_timing.py) on fake cases and clocks, ffcv's page-cache
arithmetic on layouts small enough to count by hand, bench_loader's rows from made-up rates,
the markdown splice that keeps notes written by hand, and every committed results/bench_*.json
rendering to the generated part of its markdown."""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
with pytest.MonkeyPatch.context() as _patch:  # the tools import their siblings from tools/
    _patch.syspath_prepend(str(REPO / "tools"))
    import bench_check_data
    import bench_deit_loaders
    import bench_engine
    import bench_loader
    import bench_loader_cache as cache
    import bench_loader_report
    import bench_pgt
    import bench_record
    from bench_loader_adapters import RESOLUTIONS, SETTING_NAMES, WORKER_COUNTS
    from bench_timing import Spread, rotated, seconds, side_by_side

MIB = 2**20


# --- the timing helper ----------------------------------------------------------------------

def test_spread_of_values_and_of_per_round_ratios():
    assert Spread.of([3.0, 1.0, 2.0, 10.0]) == Spread(2.5, 1.0, 10.0, 4)
    # rounds (4, 2), (9, 3), (5, 5): ratios 2, 3, 1
    assert Spread.of_ratios([4.0, 9.0, 5.0], [2.0, 3.0, 5.0]) == Spread(2.0, 1.0, 3.0, 3)
    with pytest.raises(ValueError):
        Spread.of_ratios([1.0], [1.0, 2.0])
    assert Spread(1.404, 1.381, 1.5).text() == "1.40 [1.38-1.50]"
    assert Spread(1235.4, n=3).text(".0f") == "1235"  # a median without its spread
    assert Spread.from_json(Spread(2.0, n=3).to_json()) == Spread(2.0, None, None, 3)


def test_side_by_side_warms_up_then_rotates_who_goes_first():
    calls = []
    cases = {name: (lambda name=name: calls.append(name) or len(calls)) for name in "abc"}
    measured = side_by_side(cases, 3, warmup=1)
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab"
    assert measured == {"a": [4, 9, 11], "b": [5, 7, 12], "c": [6, 8, 10]}
    calls.clear()
    into = {"a": [0]}
    side_by_side({"a": cases["a"], "b": cases["b"]}, 2, first_round=1, into=into)
    assert "".join(calls) == "ba" + "ab"  # round 1 starts with the second case
    assert into == {"a": [0, 2, 3], "b": [1, 4]}
    assert rotated(["x", "y"], 5) == ["y", "x"]


def test_seconds_is_the_clock_span_over_the_calls():
    ticks, calls = iter([10.0, 14.0]), []
    assert seconds(lambda: calls.append(1), calls=8, clock=lambda: next(ticks)) == 0.5
    assert len(calls) == 8


# --- page-cache arithmetic ------------------------------------------------------------------

def test_pages_hold_whole_samples_at_the_mean_size():
    # 3.5 MiB samples: two fit an 8 MiB page; 9 MiB samples: one a page even though it spills
    assert cache.page_of_samples(7, 3.5 * MIB).tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert cache.page_of_samples(3, 9 * MIB).tolist() == [0, 1, 2]


def test_cache_slots_count_pages_from_prefetch_to_last_use():
    page_of = cache.page_of_samples(12, 3.5 * MIB)  # 6 pages of 2 samples
    # In order, batch 2: batch b reads page b; a page takes its slot 3 batches before its
    # batch and frees it after: at batch 1, pages 1-4 (page 0 has left) -> 4 slots.
    assert cache.cache_slots(np.arange(12), page_of, 2) == 4
    # Evens then odds: pages 0-1 are read at batches 0 and 3, 2-3 at 1 and 4, 4-5 at 2 and 5;
    # all six are held at batch 2 -> 6 slots.
    evens_then_odds = np.r_[np.arange(0, 12, 2), np.arange(1, 12, 2)]
    assert cache.cache_slots(evens_then_odds, page_of, 2) == 6
    # drop_last: 13 samples in batches of 2 read 12; sample 12 (page 6) is never read
    assert cache.cache_slots(np.arange(13), cache.page_of_samples(13, 3.5 * MIB), 2) == 4


def test_process_cache_gib_is_slots_times_pages():
    # One batch of all 12 samples reads all 6 pages at once, whatever the order: 6 x 8 MiB.
    assert cache.process_cache_gib(12, 3.5 * MIB, 12, quasi_random=False) == 6 * 8 / 1024


# --- bench_loader's rows from made-up rates -------------------------------------------------

def fake_rates() -> tuple[dict, dict]:
    variants = [f"ffcv {kind} {name}" for name in SETTING_NAMES
                for kind in ("ours", "ours-uint8", "bare", "uint8")]
    rates = {}
    for res in RESOLUTIONS:
        for w in WORKER_COUNTS:
            cell = {key: [100.0] * 3 for key in variants}
            cell.update({f"{key} w{w}": [100.0] * 3 for key in (
                "torchvision codec", "torchvision PIL", "dali", "dali read")})
            rates[(res, w)] = cell
    c = rates[(160, 1)]
    c["ffcv ours default"], c["ffcv bare default"] = [120.0, 150.0, 300.0], [100.0, 100.0, 200.0]
    c["torchvision codec w1"], c["torchvision PIL w1"] = [60.0] * 3, [40.0, 80.0, 90.0]
    c["dali read w1"] = [500.0, 400.0, 600.0]
    rates[(160, 2)]["ffcv uint8 default"] = [1000.0, 1200.0, 1500.0]
    rates[(192, 2)]["ffcv bare rn18"] = [200.0] * 3
    limits = {(n, w): [100.0] * 3 for n in SETTING_NAMES for w in WORKER_COUNTS}
    limits[("default", 1)] = [240.0, 300.0, 600.0]
    return rates, limits


def test_loader_rows_from_rates_against_hand_computation():
    rates, limits = fake_rates()
    costs = {name: {"jpeg_share": 0.5, "decode": 0.8,
                    **{f"{stage}_{res}": 0.3 for stage in ("resize", "normalise", "handoff")
                       for res in RESOLUTIONS}} for name in SETTING_NAMES}
    memory = {name: (1.0, 2.0) for name in SETTING_NAMES}
    rows = bench_loader_report.summarise(rates, limits, costs, memory, 6000, 1_000_000)
    first = rows["ffcv"][0]
    assert (first["setting"], first["px"], first["workers"]) == ("default", 160, 1)
    assert first["ours_img_per_s"] == {"median": 150.0, "low": 120.0, "high": 300.0, "n": 3}
    assert first["vs_bare"] == {"median": 1.5, "low": 1.2, "high": 1.5, "n": 3}
    # the faster torchvision variant by median is PIL (80 > 60): ratios 3, 1.875, 3.33
    assert first["vs_torchvision"]["median"] == 3.0
    assert first["vs_limit"] == {"median": 0.5, "low": 0.5, "high": 0.5, "n": 3}
    cores = {(r["setting"], r["px"]): r for r in rows["cores"]}
    assert cores[("default", 160)]["gpu_path_img_per_s_per_core"] == 600.0  # 1200 / 2 cores
    assert cores[("default", 160)]["cores_per_a100"] == 5.0  # 3000 / 600
    assert cores[("default", 160)]["cores_per_h100"] == 10.0
    stage = rows["stages"][0]
    assert stage["workers_sum_ms"] == pytest.approx(0.4 + 0.3)
    assert stage["measured_1_worker_ms"] == 10.0  # 1000 / 100 img/s
    assert rows["dali"][0]["cores_per_a100_floor"] == 6.0  # 3000 / 500 read img/s per core
    assert rows["page_cache"][0]["per_sample_kb"] == pytest.approx(543.419608424)
    # the verdict's counts of cells within 5 % of the bare loader, per worker count, for
    # the same output and before normalisation
    same, uint8 = bench_loader_report.verdict(rows["ffcv"]).split("; before normalisation")
    assert re.findall(r"(\d+) of (\d+) with (\d+) worker", same) == [
        ("9", "9", "1"), ("8", "9", "2")]
    assert re.findall(r"(\d+) of (\d+) with (\d+) worker", uint8) == [
        ("9", "9", "1"), ("8", "9", "2")]  # (160 px, 2 workers): ours-uint8 100 / uint8 1200
    facts = bench_loader_report.facts(1280, {"a": 5.0, "b": 9.0}, {n: 1280e3 for n in
                                      SETTING_NAMES}, 378.0, 6000, 1_000_000)
    record = {"command": "c", "date": None, "params": {"images": 1280, "batch_size": 64,
              "stage_rounds": 5}, "machine": {"arch": "x", "cores": 2, "platform": "p"},
              "rows": rows, "facts": facts}
    text = bench_loader_report.render(record)
    # (192 px, 2 workers) uint8 at 100 img/s: 50 per core, 60 cores per A100
    assert re.search(r"\(160-192 px\): (NOT met|met) \((\S+) at most here\)", text).groups() \
        == ("NOT met", "60.0")
    assert re.search(r"TorchCodec ahead of PIL in (\d+) of (\d+) cells", text).groups() == (
        "0", "6")


# --- records and markdown -------------------------------------------------------------------

def test_splice_replaces_the_generated_part_and_keeps_notes():
    begin = "<!-- GENERATED x -->"
    assert bench_record.splice(None, "new\n", begin) == f"{begin}\nnew\n{bench_record.END}\n"
    old = f"intro\n{begin}\nold\n{bench_record.END}\n\n## Notes\nby hand\n"
    assert bench_record.splice(old, "new", begin) == (
        f"intro\n{begin}\nnew\n{bench_record.END}\n\n## Notes\nby hand\n")
    assert bench_record.splice("a file without markers\n", "new", begin) == (
        f"{begin}\nnew\n{bench_record.END}\n")


TOOLS = {"bench_pgt": bench_pgt, "bench_engine": bench_engine, "bench_loader": bench_loader,
         "bench_check_data": bench_check_data, "bench_deit_loaders": bench_deit_loaders}


@pytest.mark.parametrize("record_path", sorted((REPO / "results").glob("bench_*.json")),
                         ids=lambda p: p.name)
def test_committed_record_renders_to_its_markdown(record_path, capsys):
    tool = json.loads(record_path.read_text())["tool"]
    TOOLS[tool].main(["--render", str(record_path)])
    printed = capsys.readouterr().out
    markdown = record_path.with_suffix(".md").read_text()
    generated = markdown.split(" -->\n", 1)[1].split(bench_record.END)[0]
    assert printed == generated + "\n"  # print's newline
    assert f"from results/{record_path.name} by" in markdown.splitlines()[0]


def test_bench_pgt_tiny_run_writes_a_record_its_rows_agree_with(tmp_path):
    path = tmp_path / "pgt.json"
    threads = str(torch.get_num_threads())  # the tool sets it: leave this process's as it is
    record = bench_pgt.main(["--sizes", "32x5", "--rounds", "3", "--no-compile", "--batch", "0",
                             "--threads", threads, "--json", str(path)])
    assert json.loads(path.read_text()) == record
    assert record["command"].startswith("python tools/bench_pgt.py --sizes 32x5 --rounds 3")
    (row,) = record["rows"]["cases"]
    (samples,) = record["samples"].values()
    ce, pgt = samples["cross_entropy_s"], samples["pgt_s"]
    assert len(ce) == len(pgt) == 3
    assert row["ratio"]["median"] == pytest.approx(
        statistics.median(p / c for p, c in zip(pgt, ce)))
    assert row["cross_entropy_ms"]["median"] == pytest.approx(statistics.median(ce) * 1e3)
    assert (row["kind"], row["n"], row["c"], row["compiled"]) == ("loss_op", 32, 5, False)
