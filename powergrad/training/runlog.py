"""What a run writes besides checkpoints: TensorBoard events, timm-style summary.csv, the
resolved recipe and a final JSON summary (the console lines are the training loop's). Only
rank 0 writes."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from powergrad.config.loading import dump_recipe
from powergrad.config.schema import Recipe

# timm's summary.csv columns first (epoch, train_loss, eval_loss, eval_top1, eval_top5, lr),
# then the ones timm does not write.
SUMMARY_COLUMNS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr",
                   "train_top1", "img_per_sec", "data_wait_frac", "epoch_seconds",
                   "train_images", "bad_images"]


def train_img_per_sec(rows: list[dict]) -> float:
    """The one images/s figure of a run (epoch line, final.json, compare): images trained,
    over all processes, per second of training (evaluation and checkpoints excluded), over
    the given epochs (summary rows or the engine's history; NaN without a trained second)."""
    seconds = sum(float(r["epoch_seconds"]) for r in rows)
    return sum(float(r["train_images"]) for r in rows) / seconds if seconds else float("nan")

# A run's results, as final.json records them (from the epoch history) and as
# `powergrad compare` reads them back (from the TensorBoard scalars): one list for both, so
# the two cannot drift apart. result -> (summary.csv column, TensorBoard tag, which epoch:
# the last one, or the best by that column).
RESULT_FIELDS = {
    "final_test_top1": ("eval_top1", "eval/top1", "last"),
    "best_test_top1": ("eval_top1", "eval/top1", "best"),
    "final_train_top1": ("train_top1", "epoch/train_top1", "last"),
    "final_train_loss": ("train_loss", "epoch/train_loss", "last"),
}
# the per-epoch training scalars the engine logs under these tags
EPOCH_TAGS = {column: tag for column, tag, _ in RESULT_FIELDS.values()
              if tag.startswith("epoch/")}


class RunLog:
    def __init__(self, run_dir: Path, recipe: Recipe, enabled: bool = True,
                 ran_with: dict | None = None):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, self.run_dir / "recipe.yaml", ran_with)
        self.writer = SummaryWriter(log_dir=str(self.run_dir))
        self.writer.add_text("recipe", f"digest {recipe.digest()}\n\n```yaml\n"
                                       f"{recipe.to_yaml()}\n```", 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def write_summary(self, history: list[dict]) -> None:
        """summary.csv from the whole history, written to a temporary file and renamed: a
        resumed run rewrites its rows, never appends them twice."""
        if not self.enabled:
            return
        path = self.run_dir / "summary.csv"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
            out.writeheader()
            out.writerows(history)
        os.replace(tmp, path)

    def hparams(self, recipe: Recipe, metrics: dict[str, float]) -> None:
        """Flat recipe values beside the final metrics, for TensorBoard's HPARAMS tab."""
        if not self.writer:
            return
        flat = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                for key, value in recipe.flat().items() if key != "description"}
        flat["digest"] = recipe.digest()
        self.writer.add_hparams(flat, {f"hparam/{k}": v for k, v in metrics.items()},
                                run_name=".")

    def final(self, summary: dict) -> None:
        if self.enabled:
            (self.run_dir / "final.json").write_text(json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        if self.writer:
            self.writer.close()
