"""powergrad: image-classification training with the PowerGrad Transform and GPAS on timm."""
from .transform import PowerGradCrossEntropy, logit_stats, powergrad_probs, wrap_loss

__version__ = "0.1.0"
__all__ = ["PowerGradCrossEntropy", "wrap_loss", "powergrad_probs", "logit_stats"]
