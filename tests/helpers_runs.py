"""The finished tiny Fashion-MNIST run that tests/conftest.py trains once per session (once per
xdist worker) and copies into each test that asks for `finished_run`; its recipe and settings
are here for the tests that train its twin, continue it, or change one of its settings."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FINISHED_RECIPE = REPO / "recipes" / "fashion_mnist" / "resnet_pgt.yaml"
# The recipe's own model (BatchNorm, so its running statistics travel through checkpoints,
# exports and validate) and PGT, on a slice of the real data: 2 epochs of 8 steps (256 images
# in batches of 32), so a run can be stopped and resumed in either epoch; 51 test images, an
# odd count that 2 processes share unevenly, in batches of 16. One thread: a twin trained by a
# test matches it bit for bit.
FINISHED_SETTINGS = ["data.train_subset=256", "data.eval_subset=51", "train.batch_size=32",
                     "train.eval_batch_size=16", "train.epochs=2", "log.log_interval=2",
                     "train.channels_last=false", "train.threads=1"]


def finished_args(out: Path) -> list[str]:
    """`powergrad train` arguments (after "train") that train the finished run under `out`."""
    return [str(FINISHED_RECIPE), *FINISHED_SETTINGS, f"log.output={out}"]
