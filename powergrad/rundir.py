"""A run directory is one recipe's record: a lock keeps a second process out while a run
writes it, and a changed recipe is refused instead of continuing under the old settings."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .recipe import Recipe, RecipeError, load_recipe

LOCK_NAME = "run.lock"


class RunDirError(Exception):
    """The run directory cannot take this run (in use, or holding another recipe's run)."""


def recipe_changes(old: Recipe, new: Recipe) -> list[str]:
    """'key: old -> new' for every setting that decides what trains and differs."""
    old_flat, new_flat = old.flat(), new.flat()
    return [f"{key}: {old_flat.get(key)!r} -> {new_flat.get(key)!r}"
            for key in sorted(set(old_flat) | set(new_flat))
            if Recipe.decides_training(key) and old_flat.get(key) != new_flat.get(key)]


def check_same_recipe(run_dir: Path, recipe: Recipe) -> None:
    """Refuse to write into a run directory that holds a run of other settings."""
    saved = Path(run_dir) / "recipe.yaml"
    if not saved.is_file():
        return
    try:
        old = load_recipe(saved)
    except RecipeError as err:
        raise RunDirError(f"{run_dir}: its recipe.yaml cannot be read ({err}); move the folder "
                          "away or start a new run with log.experiment=NAME") from None
    if old.digest() == recipe.digest():
        return
    changes = recipe_changes(old, recipe)
    raise RunDirError(
        f"{run_dir} holds a run of other settings (digest {old.digest()}, this recipe "
        f"{recipe.digest()}): {'; '.join(changes) or 'see recipe.yaml'}. A run directory "
        "records one recipe: undo the change to continue that run, or start a new one with "
        "log.experiment=NAME (or another log.output). To train longer, start a new run: more "
        "epochs change the whole schedule.")


class RunLock:
    """run.lock in the run directory, created exclusively and removed on exit. A lock whose
    process is gone (same host, pid not alive) is stale and taken over with a note."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._is_stale(holder):
                    raise RunDirError(
                        f"{self.path.parent} is in use by process {holder.get('pid')} on "
                        f"{holder.get('host')} (since {holder.get('since')}): two runs in one "
                        f"folder would mix their records. Wait for it to finish; if that "
                        f"process is gone, delete {self.path}") from None
                print(f"note: removing a stale lock {self.path} ({holder})", flush=True)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunDirError(f"{self.path}: could not take the lock")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # half-written by a process that died at once: stale

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # another machine's process: cannot tell, so respect it
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError, TypeError):
            return False
        return False
