"""Inference for people: a Predictor built from a checkpoint alone (its metadata carries classes and preprocessing),
face detection and alignment (``faces``), video (``video``), ONNX export (``export``) and a web page (``serve``)."""
from .predictor import ImageResult, Prediction, Predictor, load_checkpoint_model

__all__ = ["Predictor", "Prediction", "ImageResult", "load_checkpoint_model"]
