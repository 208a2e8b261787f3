"""vrepa_kernels: fused, blockwise Token Relation Distillation (TRD) loss for VideoREPA finetuning."""
from .api import TRDLoss, trd_loss
from .reference import trd_loss_reference

__version__ = "0.1.0"
__all__ = ["trd_loss", "TRDLoss", "trd_loss_reference", "__version__"]
