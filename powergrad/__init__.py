"""powergrad: image-classification training with the PowerGrad Transform and GPAS on timm."""
__version__ = "0.1.0"
__all__ = ["PowerGradCrossEntropy", "wrap_loss", "powergrad_probs", "logit_stats"]


def __getattr__(name: str):
    """The public API, imported on first use: `powergrad --version` and `--help` then start
    without torch."""
    if name in __all__:
        from powergrad import transform
        return getattr(transform, name)
    raise AttributeError(f"module 'powergrad' has no attribute {name!r}")
