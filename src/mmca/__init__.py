"""mmca: Multi-Modality Cross Attention for image-sentence matching (Wei et al., CVPR 2020)."""

from mmca.config import ModelConfig
from mmca.errors import MmcaError

__version__ = "0.1.0"
__all__ = ["ModelConfig", "MmcaError", "__version__"]
