"""Named weights, offline: the models shipped inside the package and the user's own, never a download.

* ``ferkit:<name>``: a file ``<name>.safetensors`` in the package's ``ferkit/weights/`` (with its model card
  ``<name>.md``), else in the folder ``$FERKIT_WEIGHTS``;
* a bare name: a path (a weights file or a run directory) if one exists, else ``$FERKIT_WEIGHTS/<name>[.safetensors]``.

Everything that takes a checkpoint takes these names: ``create_model(pretrained=...)``,
``Predictor.from_pretrained(...)``, ``ferkit predict / serve / export / eval``; ``ferkit models`` lists them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["BUILTIN_DIR", "DEFAULT_WEIGHTS", "ENV_DIR", "WeightsNotFound", "resolve_weights", "list_weights",
           "is_weights_name"]

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "weights"
ENV_DIR = "FERKIT_WEIGHTS"
DEFAULT_WEIGHTS = "ferkit:resnet18-fer7"  # what predict / serve use when no model is named
_PREFIX = "ferkit:"


class WeightsNotFound(FileNotFoundError):
    pass


def _user_dir() -> Path | None:
    value = os.environ.get(ENV_DIR, "").strip()
    return Path(value).expanduser() if value else None


def _in(folder: Path | None, name: str) -> Path | None:
    if folder is None or not name or "/" in name or name in (".", ".."):
        return None
    for candidate in (folder / f"{name}.safetensors", folder / name):
        if candidate.is_file():
            return candidate
    return None


def is_weights_name(spec: str | Path) -> bool:
    """``ferkit:<name>``: always a name, never a path."""
    return str(spec).startswith(_PREFIX)


def resolve_weights(spec: str | Path) -> Path:
    """A weights name or path -> the file (or run directory) it stands for; a one-line error naming what was looked
    at when there is none."""
    text = str(spec).strip()
    if is_weights_name(text):
        name = text[len(_PREFIX):]
        found = _in(BUILTIN_DIR, name) or _in(_user_dir(), name)
        if found is None:
            raise WeightsNotFound(f"{text}: no built-in weights of that name (nor in ${ENV_DIR}); known: "
                                  f"{', '.join(w['name'] for w in list_weights()) or 'none'}")
        return found
    path = Path(text).expanduser()
    if path.exists():
        return path
    found = _in(_user_dir(), text)
    if found is None:
        where = f" nor in ${ENV_DIR}={_user_dir()}" if _user_dir() else f" (${ENV_DIR} is not set)"
        raise WeightsNotFound(f"{text}: weights file not found{where}; `ferkit models` lists the named weights")
    return found


def list_weights() -> list[dict[str, Any]]:
    """The built-in weights, then those under ``$FERKIT_WEIGHTS``: name, file, model, classes, input size, MB,
    and the model card's one-line summary (``card.summary`` in the file's metadata)."""
    out = []
    for origin, folder in (("built-in", BUILTIN_DIR), ("user", _user_dir())):
        if folder is None or not folder.is_dir():
            continue
        for f in sorted(folder.glob("*.safetensors")):
            meta = _metadata(f)
            out.append({"name": _PREFIX + f.stem, "origin": origin, "path": str(f), "model": meta.get("model"),
                        "classes": meta.get("class_names"), "input_size": meta.get("input_size"),
                        "mb": round(f.stat().st_size / 2**20, 1),
                        "summary": (meta.get("card") or {}).get("summary", "")})
    return out


def _metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("ferkit", "{}"))
    except Exception:  # a foreign or damaged file is listed without metadata, not a crash of `ferkit models`
        return {}
