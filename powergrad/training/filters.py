"""Filter collapse, the PGT paper's observation on BN-free ResNets that some convolution
filters "zero out": per conv layer, how many filters' weight norms have fallen below a fixed
fraction of their norms at initialisation."""
from __future__ import annotations

import torch
import torch.nn as nn

# A filter counts as collapsed below 1 % of its initial norm (the paper gives no threshold).
COLLAPSE_FRACTION = 0.01


def filter_norms(conv: nn.Conv2d) -> torch.Tensor:
    """L2 norm of each output filter's weights, float32 [out_channels]."""
    return conv.weight.detach().float().flatten(1).norm(dim=1)


class FilterCollapse:
    """Built on the freshly initialised model, already on its device: the seed decides the
    initial weights, so a resumed run (which rebuilds the model from the seed before loading
    its checkpoint) gets the same reference norms."""

    def __init__(self, model: nn.Module, fraction: float = COLLAPSE_FRACTION):
        self.convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        self.thresholds = [fraction * filter_norms(m) for _, m in self.convs]

    @torch.no_grad()
    def counts(self) -> dict[str, float]:
        """filters/collapsed/LAYER per conv layer, their total and the share of all filters."""
        out, total, filters = {}, 0, 0
        for (name, conv), threshold in zip(self.convs, self.thresholds):
            hits = int((filter_norms(conv) < threshold).sum())
            out[f"filters/collapsed/{name}"] = hits
            total, filters = total + hits, filters + len(threshold)
        out["filters/collapsed_total"] = total
        out["filters/collapsed_share"] = total / filters if filters else 0.0
        return out
