"""Tiny study recipes and an in-process trainer for the study tests (tests/test_study.py, and
tests/test_study_slurm.py with its own sizes)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tiny_recipes(folder: Path, channels: str, train_subset: int, batch_size: int,
                 log_interval: int) -> None:
    """base.yaml and pgt.yaml: a one-block-per-stage Fashion-MNIST ResNet for 2 epochs, its
    PGT twin at alpha 0.25."""
    (folder / "base.yaml").write_text(f"""\
extends: {ROOT}/recipes/fashion_mnist/resnet_baseline.yaml
description: tiny baseline
model:
  kwargs: {{layers: [1, 1, 1, 1], channels: {channels}}}
data: {{train_subset: {train_subset}, eval_subset: 200}}
sched: {{warmup_epochs: 0}}
train: {{epochs: 2, batch_size: {batch_size}, eval_batch_size: 200, threads: 1}}
log: {{log_interval: {log_interval}}}
""")
    (folder / "pgt.yaml").write_text("extends: base.yaml\ndescription: tiny PGT\n"
                                     "pgt: {enabled: true, alpha: 0.25}\n")


def in_process_train(command, log_file, timeout):
    """`powergrad train` in this process: the same code path, without a fresh interpreter
    (importing torch and timm) per run."""
    from powergrad.commands.train import main

    return main(command[command.index("train") + 1:])
