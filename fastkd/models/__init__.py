"""Model zoo built from torchvision's building blocks, sized from the dataset description."""
from .zoo import MODELS, MULTI_EXIT_MODELS, MultiExitNet, build_model

__all__ = ["MODELS", "MULTI_EXIT_MODELS", "MultiExitNet", "build_model"]
