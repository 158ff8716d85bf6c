"""Progress you can see: a tqdm bar with rate and ETA on a terminal, and plain rate and ETA lines
in a log file (a SLURM job's output), for every long loop of the suite."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """A tqdm bar with rate and ETA on a terminal; plain log lines every `every` steps when
    output goes to a file or CI."""

    def __init__(self, total: int, desc: str, enabled: bool = True, every: int = 50,
                 unit: str = "batch"):
        self.interactive = enabled and sys.stderr.isatty()
        self.enabled, self.every, self.total, self.desc = enabled, every, total, desc
        self.unit = unit
        self.count, self.start, self.next_line = 0, time.perf_counter(), every
        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True,
                        leave=True) if self.interactive else None

    def update(self, postfix: dict[str, str] | int | None = None, steps: int = 1) -> None:
        """`steps` items done (batches, with the postfix values shown), or `postfix` items when
        it is an int."""
        steps = postfix if isinstance(postfix, int) else steps
        postfix = postfix if isinstance(postfix, dict) else {}
        self.count += steps
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(steps)
        elif self.enabled and self.count >= self.next_line and self.count < self.total:
            self.next_line = (self.count // self.every + 1) * self.every
            self._line(postfix)

    def _line(self, postfix: dict[str, str]) -> None:
        elapsed = time.perf_counter() - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.count) / rate if rate > 0 else 0.0
        items = "".join(f" {k} {v}" for k, v in postfix.items())
        print(f"{self.desc} {self.count}/{self.total}{items} "
              f"[{rate:.1f} {self.unit}/s, eta {eta:.0f}s]", flush=True)

    def close(self, postfix: dict[str, str] | None = None) -> None:
        """End the bar; `postfix`: the values of its last line (e.g. over all processes),
        which a log then gets as its own last line."""
        if self.bar is not None:
            if postfix is not None:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.close()
        elif self.enabled and postfix is not None:
            self._line(postfix)


def with_progress(items: list, desc: str, unit: str, lines: int = 20):
    """Iterate `items` with a Progress bar on a terminal, or about `lines` rate and ETA lines
    in a log (a SLURM job's output): long tools are never silent for hours."""
    bar = Progress(len(items), desc, unit=unit, every=max(1, len(items) // lines))
    for item in items:
        yield item
        bar.update(1)
    bar.close({})
