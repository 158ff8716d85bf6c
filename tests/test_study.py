"""The seeded study (tools/study.py): interval arithmetic against hand computations, the
verdict rule, skipping finished runs and refusing changed ones, the time budget, and a tiny
2-recipe x 2-seed grid on Fashion-MNIST from training to study.md and its plots."""
from __future__ import annotations

import csv
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from powergrad.config.loading import load_recipe
from powergrad.study.report import (Interval, first_epoch_reaching, paired, read_records,
                                    t_interval, verdict, why, write_report)
from powergrad.study.runner import (EXIT_PREEMPTED, StudyError, load_plan, run_recipe, run_study,
                                    status_lines, subprocess_train)

ROOT = Path(__file__).resolve().parent.parent

# Student's t quantiles t(0.975, df), as printed in statistics tables (e.g. NIST/SEMATECH
# e-Handbook, table 1.3.6.7.2), typed in rather than computed by the library under test.
T975 = {2: 4.302653, 4: 2.776445}


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models gain nothing from a second thread beside other busy processes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_plan(tmp_path: Path, seeds=(0, 1)) -> Path:
    """Two tiny Fashion-MNIST recipes (a 4-8 channel ResNet, 256 training images, 2 epochs)
    and a plan comparing them."""
    (tmp_path / "base.yaml").write_text(f"""\
extends: {ROOT}/recipes/fashion_mnist/resnet_baseline.yaml
description: tiny baseline
model:
  kwargs: {{layers: [1, 1, 1, 1], channels: [4, 8, 8, 8]}}
data: {{train_subset: 256, eval_subset: 200}}
sched: {{warmup_epochs: 0}}
train: {{epochs: 2, batch_size: 64, eval_batch_size: 200, threads: 1}}
log: {{log_interval: 2}}
""")
    (tmp_path / "pgt.yaml").write_text("extends: base.yaml\ndescription: tiny PGT\n"
                                       "pgt: {enabled: true, alpha: 0.25}\n")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""\
margin_points: 0.1
fits_at: 99.0
throughput_note: a guess
throughput:
  tiny: {{train: 5000, eval: 5000, startup: 5}}
arms:
  base: {{recipe: base.yaml, seeds: {list(seeds)}, cost: tiny}}
  pgt: {{recipe: pgt.yaml, seeds: {list(seeds)}, cost: tiny}}
claims:
  pgt_tiny:
    statement: PGT raises test top-1
    source: a test
    baseline: base
    arms: [pgt]
    sweep: pgt.alpha
    expect: {{final_test_top1: higher, logit_norm: higher, epochs_to_baseline: lower}}
    paper: {{final_test_top1: "+0.09"}}
  unbuilt:
    statement: needs a feature
    source: nowhere
    requires: a feature the suite lacks
""")
    return plan


def write_record(records: Path, arm: str, seed: int, test_top1: list[float],
                 digest: str | None = None, logit_norm: float = 1.0,
                 diag: dict[str, float] | None = None) -> None:
    """A finished run's record with the given test top-1 per epoch."""
    folder = records / arm / f"s{seed}"
    folder.mkdir(parents=True)
    (folder / "final.json").write_text(json.dumps({
        "final_test_top1": test_top1[-1], "best_test_top1": max(test_top1),
        "final_train_top1": 90.0, "final_train_loss": 0.3, "digest": digest}))
    with open(folder / "summary.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["epoch", "eval_top1"])
        out.writerows([e, v] for e, v in enumerate(test_top1))
    diag = {"pgt/logit_norm": logit_norm, **(diag or {})}
    (folder / "diagnostics.json").write_text(json.dumps(
        {"scalars": {tag: {"mean": value} for tag, value in diag.items()}}))


# --- arithmetic against hand computations ---------------------------------------------------------


def test_t_interval_matches_hand_computations():
    # results/README.md's three seeds: PGT - baseline = 0.55, 0.10, 0.55 points. By hand:
    # mean 0.4; sd = sqrt((0.15^2 + 0.3^2 + 0.15^2) / 2) = sqrt(0.0675); se = sd / sqrt(3) = 0.15
    got = t_interval([0.55, 0.10, 0.55])
    half = T975[2] * 0.15
    assert got.n == 3 and got.mean == pytest.approx(0.4)
    assert got.sd == pytest.approx(0.0675 ** 0.5)
    assert (got.low, got.high) == pytest.approx((0.4 - half, 0.4 + half), abs=1e-6)
    # five seeds: mean 0.3; sd = sqrt((0 + 0.04 + 0.04 + 0.01 + 0.01) / 4) = sqrt(0.025)
    got = t_interval([0.3, 0.5, 0.1, 0.4, 0.2])
    half = T975[4] * (0.025 / 5) ** 0.5
    assert (got.low, got.high) == pytest.approx((0.3 - half, 0.3 + half), abs=1e-6)
    assert t_interval([0.7]).low is None  # one pair: no interval


def test_paired_differences_and_the_report_from_records(tmp_path):
    plan = load_plan(tiny_plan(tmp_path, seeds=(0, 1, 2)))
    records = tmp_path / "records"
    # results/fashion_mnist_seeds.md: baseline 91.34, 91.54, 91.53; PGT 91.89, 91.64, 92.08
    for seed, (base, pgt) in enumerate([(91.34, 91.89), (91.54, 91.64), (91.53, 92.08)]):
        write_record(records, "base", seed, [90.0, base], logit_norm=13.0)
        write_record(records, "pgt", seed, [91.0, pgt], logit_norm=50.0 + seed)
    got = paired("final_test_top1", read_records(plan, list(plan.claims.values()), records),
                 "pgt", "base", (0, 1, 2))
    half = T975[2] * 0.15
    assert (got.mean, got.low, got.high) == pytest.approx((0.4, 0.4 - half, 0.4 + half))

    md = write_report(plan, list(plan.claims.values()), records, tmp_path / "out" / "study",
                      "python tools/study.py --report-only")
    text = md.read_text()
    # baseline mean 91.47, sd sqrt((0.13^2 + 0.07^2 + 0.06^2) / 2) = 0.1127
    assert "| base | `" in text and "| 91.47 ± 0.11 |" in text
    assert (f"| pgt_tiny | under-fits (baseline train top-1 90.00 %) | pgt vs base | "
            f"final_test_top1 (higher) | +0.09 | +0.40 [{0.4 - half:+.2f}, {0.4 + half:+.2f}], "
            "n = 3 | inconclusive at this scale |") in text
    assert "| logit_norm (higher) | - | +38.00 [" in text  # 50, 51, 52 against 13: sd 1
    assert "| reproduces |" in text  # logit norm: +38 +- 4.30 * 1 / sqrt(3) lies above 0
    assert "| unbuilt | - | - | - | - | not measured: needs a feature the suite lacks |" in text
    # PGT reaches the baseline's final accuracy in epoch 2 of 2, like the baseline itself
    assert "seed 0: 2 / 2; seed 1: 2 / 2; seed 2: 2 / 2" in text
    assert "Student's t distribution" in text
    assert (tmp_path / "out" / "study" / "pgt_tiny.png").stat().st_size > 1000
    assert (tmp_path / "out" / "study" / "pgt_tiny_sweep.png").stat().st_size > 1000


def test_the_verdict_table_lands_in_the_readme_between_its_markers(tmp_path):
    plan = load_plan(tiny_plan(tmp_path, seeds=(0, 1, 2)))
    records, readme = tmp_path / "records", tmp_path / "README.md"
    for seed, (base, pgt) in enumerate([(91.34, 91.89), (91.54, 91.64), (91.53, 92.08)]):
        write_record(records, "base", seed, [90.0, base], logit_norm=13.0)
        write_record(records, "pgt", seed, [91.0, pgt], logit_norm=50.0 + seed)
    readme.write_text("# Results\n\nkept above\n")
    for _ in range(2):  # the second run replaces the block, it does not add another
        write_report(plan, list(plan.claims.values()), records, tmp_path / "out" / "study",
                     "python tools/study.py --report-only", readme=readme)
    text = readme.read_text()
    assert text.startswith("# Results\n\nkept above\n") and text.count("| claim |") == 1
    assert "From `out/study.md`" in text and "`python tools/study.py --report-only`" in text
    half = T975[2] * 0.15
    assert (f"| pgt_tiny | pgt vs base: final_test_top1 (higher) | +0.09 | +0.40 "
            f"[{0.4 - half:+.2f}, {0.4 + half:+.2f}], n = 3 | inconclusive at this scale | "
            "the interval spans 0 and the margin: more seeds or a longer schedule needed |"
            ) in text
    assert "pgt vs base: logit_norm (higher) | - | +38.00 [" in text
    assert "| reproduces | the interval lies above 0 |" in text
    assert "| unbuilt | - | - | - | not measured | needs a feature the suite lacks |" in text


def test_block_profiles_give_the_peak_variance_and_mean_gradient_norm(tmp_path):
    plan_file = tiny_plan(tmp_path, seeds=(0, 1, 2))
    plan_file.write_text(plan_file.read_text().replace(
        "    sweep: pgt.alpha\n", "    profiles: true\n").replace(
        "{final_test_top1: higher, logit_norm: higher, epochs_to_baseline: lower}",
        "{peak_block_var: lower, mean_block_grad_norm: higher}"))
    plan, records = load_plan(plan_file), tmp_path / "records"

    def blocks(var, grad, gate=None):
        tags = {f"gpas/var/block{i:02d}": v for i, v in enumerate(var)}
        tags |= {f"gpas/grad_norm/block{i:02d}": g for i, g in enumerate(grad)}
        tags |= {f"gpas/gate/block{i:02d}": g for i, g in enumerate(gate or [])}
        tags |= {f"gpas/gate_scale/block{i:02d}": 9.0 for i, g in enumerate(gate or [])}
        return tags

    for seed, peak in enumerate([0.3, 0.25, 0.35]):
        write_record(records, "base", seed, [80.0], diag=blocks([0.2, 0.5, 0.4], [1, 2, 3]))
        write_record(records, "pgt", seed, [80.0],
                     diag=blocks([0.1, peak, 0.2], [2, 2, 2 + seed], gate=[-0.1, 0.0, 0.1]))
    text = write_report(plan, list(plan.claims.values()), records, tmp_path / "study",
                        "cmd").read_text()
    # peaks 0.3, 0.25, 0.35 against 0.5: differences -0.2, -0.25, -0.15, sd 0.05;
    # half width 4.302653 * 0.05 / sqrt(3) = 0.1242
    assert "| peak_block_var (lower) | - | -0.20 [-0.32, -0.08], n = 3 | reproduces |" in text
    # mean gradient norms 2, 2.333, 2.667 against 2: differences 0, 0.333, 0.667, sd 0.333;
    # half width 4.302653 * 0.3333 / sqrt(3) = 0.8280
    assert ("| mean_block_grad_norm (higher) | - | +0.33 [-0.49, +1.16], n = 3 | "
            "inconclusive at this scale |") in text
    assert (tmp_path / "study" / "pgt_tiny_blocks.png").stat().st_size > 1000


def test_collapsed_filters_are_compared_and_plotted_per_layer(tmp_path):
    plan_file = tiny_plan(tmp_path, seeds=(0, 1, 2))
    plan_file.write_text(plan_file.read_text().replace("    sweep: pgt.alpha\n", "").replace(
        "{final_test_top1: higher, logit_norm: higher, epochs_to_baseline: lower}",
        "{collapsed_filters: lower}"))
    plan, records = load_plan(plan_file), tmp_path / "records"

    def layers(counts):
        tags = {f"filters/collapsed/layer{i}.conv": c for i, c in enumerate(counts)}
        return tags | {"filters/collapsed_total": sum(counts)}

    for seed, extra in enumerate([0, 2, 4]):
        write_record(records, "base", seed, [80.0], diag=layers([3, 5 + extra]))
        write_record(records, "pgt", seed, [80.0], diag=layers([1, 2]))
    text = write_report(plan, list(plan.claims.values()), records, tmp_path / "study",
                        "cmd").read_text()
    # totals 3 against 8, 10, 12: differences -5, -7, -9, sd 2; half width
    # 4.302653 * 2 / sqrt(3) = 4.968
    assert "| collapsed_filters (lower) | - | -7.00 [-11.97, -2.03], n = 3 | reproduces |" in text
    assert why(t_interval([0.0, 0.0, 0.0]), "lower", 0.0).startswith("every seed pair gave")
    assert (tmp_path / "study" / "pgt_tiny_layers.png").stat().st_size > 1000


def test_epochs_to_a_target_count_from_one():
    history = [{"epoch": 0, "eval_top1": 80.0}, {"epoch": 1, "eval_top1": 88.5},
               {"epoch": 2, "eval_top1": 88.0}]
    assert first_epoch_reaching(history, 88.0) == 2
    assert first_epoch_reaching(history, 80.0) == 1
    assert first_epoch_reaching(history, 89.0) == float("inf")


@pytest.mark.parametrize("interval, direction, expected", [
    ((0.4, 0.1, 0.7), "higher", "reproduces"),
    ((-0.2, -0.5, 0.1), "higher", "does not reproduce"),  # no gain as large as the margin
    ((0.1, -0.3, 0.5), "higher", "inconclusive at this scale"),
    ((-1.0, -1.5, -0.5), "lower", "reproduces"),
    ((0.0, 0.0, 0.0), "lower", "does not reproduce"),
    ((0.0, -0.2, 0.08), "no_gain", "reproduces"),
    ((0.3, 0.05, 0.5), "no_gain", "does not reproduce"),
    ((0.1, -0.2, 0.4), "no_gain", "inconclusive at this scale"),
])
def test_the_verdict_rule(interval, direction, expected):
    mean, low, high = interval
    assert verdict(Interval(mean, low, high, n=3), direction, margin=0.1) == expected


def test_verdicts_without_an_interval():
    assert verdict(Interval(0.5, None, None, n=1), "higher", 0.1) == "inconclusive at this scale"
    never = Interval(None, None, None, n=3, not_reached=2)  # one seed of three got there
    assert verdict(never, "lower", 0.0) == "does not reproduce"
    assert verdict(Interval(None, None, None, n=3, not_reached=1), "lower", 0.0) == \
        "inconclusive at this scale"


# --- the runner -----------------------------------------------------------------------------


class FakeTrain:
    """Stands in for `powergrad train`: records the command and writes a finished run."""

    def __init__(self):
        self.commands = []

    def __call__(self, command, log_file, timeout):
        self.commands.append(command)
        settings = dict(item.split("=", 1) for item in command if "=" in item)
        run_dir = Path(settings["log.output"]) / settings["log.experiment"]
        run_dir.mkdir(parents=True, exist_ok=True)
        recipe = load_recipe(command[command.index("train") + 1],
                             [item for item in command if "=" in item])
        (run_dir / "final.json").write_text(json.dumps({"final_test_top1": 50.0,
                                                        "digest": recipe.digest()}))
        return 0


def test_finished_runs_are_skipped_and_interrupted_ones_trained_again(tmp_path):
    plan = load_plan(tiny_plan(tmp_path))
    runs, records = tmp_path / "runs", tmp_path / "records"
    digest = run_recipe(plan.arms["base"], 0, runs).digest()
    write_record(records, "base", 0, [60.0], digest=digest)  # finished and recorded
    (runs / "base" / "s1").mkdir(parents=True)  # finished, record not copied yet
    (runs / "base" / "s1" / "final.json").write_text(json.dumps(
        {"final_test_top1": 61.0, "digest": run_recipe(plan.arms["base"], 1, runs).digest()}))
    (runs / "pgt" / "s0").mkdir(parents=True)  # interrupted: a checkpoint to resume from
    (runs / "pgt" / "s0" / "last.pth").write_bytes(b"")
    (runs / "pgt" / "s0.seconds").write_text("100.0\n")  # its earlier piece's wall time
    said, train = [], FakeTrain()
    assert run_study(plan, list(plan.claims.values()), runs, records, train=train,
                     say=said.append) == 0
    trained = [(c[c.index("train") + 1], c[-3], c[-2]) for c in train.commands]
    assert trained == [(str(tmp_path / "pgt.yaml"), "train.seed=0", f"log.output={runs / 'pgt'}"),
                       (str(tmp_path / "pgt.yaml"), "train.seed=1", f"log.output={runs / 'pgt'}")]
    assert any("pgt/s0: resuming" in line for line in said)
    assert {p.parent.name + "/" + p.parent.parent.name for p in records.glob("*/*/final.json")} \
        == {"s0/base", "s1/base", "s0/pgt", "s1/pgt"}
    assert json.loads((records / "base" / "s1" / "final.json").read_text())["final_test_top1"] \
        == 61.0
    assert json.loads((records / "pgt" / "s0" / "run.json").read_text())["wall_seconds"] >= 100
    assert "4 runs, 0 left" in status_lines(plan, list(plan.claims.values()), runs, records)[-1]
    # a second call trains nothing
    assert run_study(plan, list(plan.claims.values()), runs, records, train=train,
                     say=said.append) == 0 and len(train.commands) == 2


def test_a_record_of_other_settings_is_refused_before_anything_trains(tmp_path):
    plan = load_plan(tiny_plan(tmp_path))
    records = tmp_path / "records"
    write_record(records, "pgt", 1, [60.0], digest="0123456789ab")
    said, train = [], FakeTrain()
    code = run_study(plan, list(plan.claims.values()), tmp_path / "runs", records, train=train,
                     say=said.append)
    assert code == 2 and train.commands == []
    assert f"{records / 'pgt' / 's1' / 'final.json'}: digest: got '0123456789ab'" in said[-1]
    assert "the recipe changed after this run" in said[-1]


def test_a_spent_time_budget_stops_before_the_next_run(tmp_path):
    plan = load_plan(tiny_plan(tmp_path))
    said, train = [], FakeTrain()
    code = run_study(plan, list(plan.claims.values()), tmp_path / "runs", tmp_path / "records",
                     max_minutes=1e-9, train=train, say=said.append)
    assert code == EXIT_PREEMPTED and train.commands == []
    assert "time budget spent, 4 run(s) left" in said[-1]


@pytest.mark.parametrize("child, expected", [
    # a run that saves its place on SIGTERM and exits 75, as `powergrad train` does
    ("import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
     "print('started', flush=True)\ntime.sleep(30)", EXIT_PREEMPTED),
    # one still starting up, killed by SIGTERM's default action: stopped too
    ("import time\nprint('started', flush=True)\ntime.sleep(30)", EXIT_PREEMPTED),
])
def test_the_timeout_stops_a_run_with_sigterm(tmp_path, child, expected):
    log = tmp_path / "run.log"
    assert subprocess_train([sys.executable, "-c", child], log, timeout=1.0) == expected
    assert "started" in log.read_text()


def test_plan_mistakes_name_the_file_and_key(tmp_path):
    plan = tiny_plan(tmp_path)
    text = plan.read_text()
    plan.write_text(text.replace("arms: [pgt]", "arms: [pgtt]"))
    with pytest.raises(StudyError, match=r"plan.yaml: claims.pgt_tiny: names arm 'pgtt'"):
        load_plan(plan)
    plan.write_text(text.replace("seeds: [0, 1], cost: tiny}\n  pgt",
                                 "seeds: [0, 0], cost: tiny}\n  pgt"))
    with pytest.raises(StudyError, match=r"arms.base.seeds: got \[0, 0\]; expected a list of "
                                         "distinct"):
        load_plan(plan)
    plan.write_text(text.replace("logit_norm: higher", "logit_norm: up"))
    with pytest.raises(StudyError, match="expect.logit_norm: got 'up'; expected one of: higher"):
        load_plan(plan)


def test_the_shipped_plan_covers_the_claims_within_about_five_hours():
    plan = load_plan(ROOT / "tools" / "study_plan.yaml")  # every recipe loads
    assert {"pgt_bn", "pgt_fewer_epochs", "alpha_sweep", "pgt_fits", "nobn_table2",
            "nobn_batch512", "nobn_gc_sweep", "nobn_agc_sweep", "nobn_filter_collapse", "gpas_vit",
            "gpas_stop_gradient", "pgt_fork_hook"} <= set(plan.claims)
    assert len(plan.arms["bn_base"].seeds) >= 5
    sweep = plan.claims["alpha_sweep"]
    alphas = {run_recipe(plan.arms[a], 0, Path("runs")).pgt.alpha for a in sweep.arms}
    assert alphas == {0.05, 0.1, 0.25, 0.5}
    estimate = status_lines(plan, list(plan.claims.values()), Path("/nonexistent"),
                            Path("/nonexistent"))[-1]
    hours = float(estimate.split("estimated ")[1].split(" h")[0])
    assert 3.5 <= hours <= 5.0  # from the throughput table alone; 4.5 h with the new seeds


# --- end to end ------------------------------------------------------------------------------


def in_process_train(command, log_file, timeout):
    """`powergrad train` in this process: the same code path, without a fresh interpreter
    (importing torch and timm) per run."""
    from powergrad.commands.train import main

    return main(command[command.index("train") + 1:])


def test_a_tiny_grid_trains_then_reports_from_its_records(tmp_path, capsys):
    plan_file = tiny_plan(tmp_path)
    plan = load_plan(plan_file)
    runs, records, out = tmp_path / "runs", tmp_path / "records", tmp_path / "out" / "study"
    said = []
    assert run_study(plan, list(plan.claims.values()), runs, records, train=in_process_train,
                     say=said.append) == 0
    for arm in ("base", "pgt"):
        for seed in (0, 1):
            names = {p.name for p in (records / arm / f"s{seed}").iterdir()}
            assert names == {"final.json", "summary.csv", "recipe.yaml", "diagnostics.json",
                             "run.json"}  # no checkpoints, no event files
            assert any((runs / arm / f"s{seed}").glob("*.pth"))
    diag = json.loads((records / "pgt" / "s0" / "diagnostics.json").read_text())["scalars"]
    assert "pgt/logit_norm" in diag and "pgt/entropy_p_alpha" in diag

    spec = importlib.util.spec_from_file_location("study_tool", ROOT / "tools" / "study.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--plan", str(plan_file), "--records", str(records), "--out", str(out)]
    assert tool.main([*argv, "--report-only"]) == 0
    text = Path(f"{out}.md").read_text()
    assert f"Command: `python tools/study.py --report-only --plan {plan_file}" in text
    for arm in ("base", "pgt"):  # the report's means are the records' means
        values = [json.loads((records / arm / f"s{s}" / "final.json").read_text())
                  ["final_test_top1"] for s in (0, 1)]
        mean, sd = statistics.mean(values), statistics.stdev(values)
        assert f"| 2 of 2 | {mean:.2f} ± {sd:.2f} |" in text
    assert (out / "pgt_tiny.png").stat().st_size > 1000

    capsys.readouterr()
    assert tool.main([*argv, "--status", "--runs", str(runs)]) == 0
    assert "pgt_tiny: 4 done" in capsys.readouterr().out
    # the grid again: every run is finished, nothing trains
    said.clear()
    assert run_study(plan, list(plan.claims.values()), runs, records,
                     train=lambda *a: pytest.fail("trained a finished run"),
                     say=said.append) == 0
    assert said == [f"[{i}/4] {n}: done, skipped" for i, n in
                    enumerate(["base/s0", "pgt/s0", "base/s1", "pgt/s1"], 1)]
    # a changed recipe under an existing run folder is refused, naming the change
    (tmp_path / "pgt.yaml").write_text((tmp_path / "pgt.yaml").read_text().replace("0.25", "0.5"))
    plan = load_plan(plan_file)
    assert run_study(plan, list(plan.claims.values()), runs, records,
                     train=lambda *a: pytest.fail("trained a changed recipe"),
                     say=said.append) == 2
    assert "the recipe changed after this run" in said[-1]


def test_the_tool_refuses_an_unknown_claim():
    done = subprocess.run([sys.executable, "tools/study.py", "--claims", "pgt_bn,nope",
                           "--status"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert "study: --claims: unknown claim(s) nope; the plan tools/study_plan.yaml has: " \
           "pgt_bn," in done.stderr
