"""matplotlib for every PNG the suite writes (compare, describe, the study, tools)."""
from __future__ import annotations


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on servers and in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
