"""``ferkit profile``: parameters (total / trainable) and multiply-accumulates at the paper's input size, next to the
paper's figures. MACs come from ``torch.utils.flop_counter`` (FLOPs / 2)."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ferkit.models import create_model, list_models, model_info

__all__ = ["profile_model", "profile_table"]


def profile_model(name: str, num_classes: int = 7, input_size: int | None = None, **kwargs: Any) -> dict[str, Any]:
    info = model_info(name)
    model = create_model(name, num_classes=num_classes, **kwargs).eval()
    c, h, w = info.input_size
    if input_size:
        h = w = input_size
    x = torch.zeros(1, c, h, w)
    extra = {"depth": torch.zeros(1, 1, h, w)} if "depth" in info.modalities else {}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, **extra)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    macs = counter.get_total_flops() / 2
    row = {"model": name, "input": f"{h}x{w}", "params_m": total / 1e6, "trainable_m": trainable / 1e6,
           "macs_g": macs / 1e9, "paper_params_m": info.paper_params_m, "paper_macs_g": info.paper_macs_g}
    row["params_diff_pct"] = _diff(row["params_m"], info.paper_params_m)
    row["macs_diff_pct"] = _diff(row["macs_g"], info.paper_macs_g) if not input_size else None
    return row


def _diff(ours: float, paper: float | None) -> float | None:
    return None if not paper else 100.0 * (ours - paper) / paper


def profile_table(names: list[str] | None = None, **kw: Any) -> str:
    rows = [profile_model(n, **kw) for n in (names or list_models())]

    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["| model | input | params M | trainable M | MACs G | paper params M | diff % | paper MACs G | diff % |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['input']} | {r['params_m']:.3f} | {r['trainable_m']:.3f} | "
                     f"{r['macs_g']:.4f} | {f(r['paper_params_m'], '.2f')} | {f(r['params_diff_pct'], '+.2f')} | "
                     f"{f(r['paper_macs_g'], '.4f')} | {f(r['macs_diff_pct'], '+.2f')} |")
    return "\n".join(lines)
