"""Checkpoints that lose nothing: atomic writes, safetensors weights carrying inference metadata, and a resumable
training state readable with ``torch.load(weights_only=True)`` (never unrestricted pickle).

Layout in a run directory::

    checkpoints/last.safetensors   inference weights + metadata (class names, input size, normalisation, metrics)
    checkpoints/best.safetensors   same, for the best epoch on the selection split (recorded in the metadata)
    checkpoints/state.pt           everything that affects the result: method state (incl. centres / queues / momentum
                                   branches), optimisers, schedulers, scaler, RNG states, epoch, step, sampler position
"""
from __future__ import annotations

import io
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ferkit._files import remove_stale_temps

__all__ = ["CheckpointError", "STALE_TEMP_S", "atomic_write_bytes", "save_weights", "load_weights", "read_metadata",
           "save_part", "save_state", "load_state", "capture_rng", "restore_rng"]


class CheckpointError(RuntimeError):
    pass


# a temporary file of an atomic write untouched this long is a leftover of a killed process
STALE_TEMP_S = 600.0


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` (``.<name>.<random>.tmp``), fsync, then rename over it:
    a crash or a full disk leaves the previous file intact and no partial file at ``path``. A process killed
    mid-write leaves its temporary file; the next write of ``path`` removes those older than ``STALE_TEMP_S``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent, f".{path.name}.", STALE_TEMP_S)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """safetensors file; ``metadata`` (JSON-serialisable) is stored under the header key ``ferkit``."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    blob = save(tensors, metadata={"ferkit": json.dumps(metadata, default=_json_default)})
    atomic_write_bytes(path, blob)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_metadata(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({e})") from None
    if "ferkit" not in meta:
        raise CheckpointError(f"{path}: safetensors file has no ferkit metadata (class names, input size...)")
    return json.loads(meta["ferkit"])


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    meta = read_metadata(path)
    return load_file(str(path)), meta


def save_part(src: str | Path, dst: str | Path, prefix: str, **metadata: Any) -> dict[str, Any]:
    """Write the tensors of checkpoint ``src`` whose names start with ``prefix`` (a trunk: ``features.``) to ``dst``,
    with ``src``'s metadata plus ``metadata`` and the name of the source; returns that metadata."""
    state, meta = load_weights(src)
    part = {k: v for k, v in state.items() if k.startswith(prefix)}
    if not part:
        raise CheckpointError(f"{src}: no tensor named {prefix}*")
    meta = {**meta, **metadata, "part_of": str(src), "part_prefix": prefix}
    save_weights(dst, part, meta)
    return meta


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """Load a training state. Arbitrary pickled objects are refused unless ``trust`` (``--trust-checkpoint``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no training state to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else e.__class__.__name__
        hint = "" if trust else " (pass --trust-checkpoint only if you trust its origin)"
        raise CheckpointError(f"{path}: refused or unreadable training state: {first}{hint}") from None


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
