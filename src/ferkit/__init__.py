"""ferkit: facial expression recognition in PyTorch — DSAN, ARM, POSTER, D3FER and an RGB-D network."""
from .models import create_model, list_models, model_info

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "model_info", "Predictor", "__version__"]


def __getattr__(name: str):
    # ferkit.Predictor without importing the inference stack (OpenCV, face detectors) on `import ferkit`
    if name == "Predictor":
        from .inference import Predictor

        return Predictor
    raise AttributeError(f"module 'ferkit' has no attribute {name!r}")
