"""Label spaces of the FER benchmarks (SPEC 2.1) and explicit maps between them.

Labels are data: every dataset declares its ordered class names; a model carries its own in checkpoint metadata,
and moving between orders always goes through :func:`label_map`, never through a comment.
"""
from __future__ import annotations

__all__ = ["CANONICAL", "LABEL_SPACES", "SYNONYMS", "canonical_name", "label_map", "class_names_for"]

# One canonical vocabulary; dataset spellings are mapped onto it.
CANONICAL = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt")

SYNONYMS = {
    "angry": "anger", "anger": "anger", "an": "anger",
    "disgust": "disgust", "disgusted": "disgust", "di": "disgust",
    "fear": "fear", "fearful": "fear", "fe": "fear",
    "happy": "happiness", "happiness": "happiness", "ha": "happiness", "joy": "happiness",
    "sad": "sadness", "sadness": "sadness", "sa": "sadness",
    "surprise": "surprise", "surprised": "surprise", "su": "surprise",
    "neutral": "neutral", "ne": "neutral",
    "contempt": "contempt",
}

# 0-based orders as published (SPEC 2.1).
LABEL_SPACES: dict[str, tuple[str, ...]] = {
    "rafdb": ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"),
    "affectnet7": ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger"),
    "affectnet8": ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt"),
    "fer2013": ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"),
    "ferplus": ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"),
    "bu3dfe": ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"),
    "bu3dfe6": ("anger", "disgust", "fear", "happiness", "sadness", "surprise"),
    "ckplus": ("anger", "contempt", "disgust", "fear", "happiness", "sadness", "surprise"),
    "jaffe": ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"),
    # the built-in synthetic faces use the 7 basic classes in FER2013 order (+ contempt as 8th when asked for)
    "synthetic7": ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"),
    "synthetic8": ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral", "contempt"),
}


def canonical_name(name: str) -> str:
    """Map a dataset's spelling ('angry', 'HA', 'Happiness') onto the canonical vocabulary."""
    key = name.strip().lower()
    if key not in SYNONYMS:
        raise KeyError(f"unknown expression name {name!r}; known: {sorted(set(SYNONYMS.values()))}")
    return SYNONYMS[key]


def class_names_for(space: str) -> list[str]:
    if space not in LABEL_SPACES:
        raise KeyError(f"unknown label space {space!r}; known: {sorted(LABEL_SPACES)}")
    return list(LABEL_SPACES[space])


def label_map(source: list[str] | tuple[str, ...], target: list[str] | tuple[str, ...]) -> dict[int, int]:
    """Index map from one ordered class list to another, by canonical name.

    Classes of ``source`` missing from ``target`` are left out of the map (callers decide to drop them), so
    cross-dataset evaluation (e.g. 8-class model on a 7-class test set) is explicit.
    """
    tgt = {canonical_name(n): i for i, n in enumerate(target)}
    return {i: tgt[canonical_name(n)] for i, n in enumerate(source) if canonical_name(n) in tgt}
