"""A run directory is one recipe's record: a lock keeps a second process out while a run
writes it, and a changed recipe is refused instead of continuing under the old settings."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from powergrad.config.loading import RecipeError, load_recipe
from powergrad.config.schema import LogConfig, Recipe

LOCK_NAME = "run.lock"
HEARTBEAT_EVERY = 30.0  # seconds between heartbeats (at most; a quarter of stale_after)


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
    """run.lock in the run directory while a run writes it; removed on exit.

    The lock is written in full to a temporary file and hard-linked into place, which fails
    when a lock exists: a half-written lock cannot exist, and of two processes starting
    together one wins. The holder rewrites its heartbeat every `heartbeat_every` seconds from a
    thread. A lock is stale, and taken over with a note, when its heartbeat is older than
    `stale_after` seconds whatever host wrote it (a requeued job may land on another node), or
    at once when it names a process of this host that is gone. A live lock is respected from
    any host. Heartbeats compare wall clocks, so the nodes' clocks must agree to well within
    `stale_after` (NTP does)."""

    def __init__(self, run_dir: Path, stale_after: float = LogConfig().lock_stale_after):
        self.path = Path(run_dir) / LOCK_NAME
        self.stale_after = stale_after
        self.heartbeat_every = min(HEARTBEAT_EVERY, stale_after / 4)
        self.token = uuid.uuid4().hex
        self.held = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.since = time.strftime("%Y-%m-%d %H:%M:%S")
        for _ in range(3):
            if self._link_new_lock():
                self.held = True
                self._beat = threading.Thread(target=self._beat_loop, daemon=True,
                                              name="run.lock heartbeat")
                self._beat.start()
                return self
            raw, holder = self._read()
            if holder is not None and not self._is_stale(holder):
                age = time.time() - float(holder.get("heartbeat") or time.time())
                raise RunDirError(
                    f"{self.path.parent} is in use by process {holder.get('pid')} on "
                    f"{holder.get('host')} (since {holder.get('since')}, heartbeat {age:.0f} s "
                    f"ago): two runs in one folder would mix their records. Wait for it to "
                    f"finish; a lock whose heartbeat is older than {self.stale_after:g} s "
                    f"(log.lock_stale_after) is taken over") from None
            print(f"note: taking over the stale lock {self.path} ({holder or 'unreadable'})",
                  flush=True)
            self._remove_if_unchanged(raw)
        raise RunDirError(f"{self.path}: could not take the lock (another process keeps "
                          "taking it)")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.held and self._ours():
            self.path.unlink(missing_ok=True)
        self.held = False

    def _ours(self) -> bool:
        holder = self._read()[1]
        return holder is not None and holder.get("token") == self.token

    def _content(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": self.since,
                           "heartbeat": time.time(), "token": self.token})

    def _write_temp(self) -> Path:
        tmp = self.path.with_name(f".{LOCK_NAME}.{self.token}.tmp")
        with open(tmp, "w") as f:
            f.write(self._content())
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _link_new_lock(self) -> bool:
        tmp = self._write_temp()
        try:
            os.link(tmp, self.path)  # atomic, and fails when a lock is there
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            if not self._ours():
                return  # taken over while this process was stopped for too long
            os.replace(self._write_temp(), self.path)  # a whole new lock, atomically

    def _read(self) -> tuple[str | None, dict | None]:
        try:
            raw = self.path.read_text()
        except OSError:
            return None, None
        try:
            holder = json.loads(raw)
        except ValueError:
            return raw, None  # not ours (ours are never half-written): stale
        return raw, holder if isinstance(holder, dict) else None

    def _remove_if_unchanged(self, raw: str | None) -> None:
        """Remove the stale lock read as `raw`, but not a new lock another process linked
        since: move it aside, and put it back if it is not the one judged stale."""
        aside = self.path.with_name(f".{LOCK_NAME}.{self.token}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text() != raw:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink()

    def _is_stale(self, holder: dict) -> bool:
        try:  # a lock of an older powergrad has no heartbeat: its file time stands in
            heartbeat = float(holder.get("heartbeat") or self.path.stat().st_mtime)
        except (TypeError, ValueError, OSError):
            return True
        if time.time() - heartbeat > self.stale_after:
            return True
        if holder.get("host") == socket.gethostname():  # this host: is its process alive?
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, ValueError, TypeError):
                return False
        return False


def run_dir_for(recipe: Recipe) -> Path:
    """log.output/log.experiment, the experiment named after the recipe file by default."""
    name = recipe.log.experiment or Path(recipe.source or "run").stem
    return Path(recipe.log.output) / name
