"""Make ferkit's face-pretrained ResNet-18 trunk: train preset ``resnet18_ferplus_trunk`` on FERPlus train (never
RAF-DB) and write ``trunk.safetensors`` (``features.*`` only, with the run's metadata) beside the run.

    python bench/make_ferplus_trunk.py                      # -> runs/ferplus_trunk/trunk.safetensors
    python bench/make_ferplus_trunk.py --run-dir R key=value ...

The file is the stand-in for the papers' MS-Celeb-1M trunk: ``model.pretrained=<it>`` fills ``features.*`` of every
ResNet-18-based model (resnet18, dsan, arm, the classifier under d3fer) and leaves their heads fresh. An interrupted
run resumes where it stopped when the command is run again. Prints one JSON line: valid WA / UA, minutes, path.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import REPO, default_data_root

PRESET = "resnet18_ferplus_trunk"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=REPO / "runs" / "ferplus_trunk")
    p.add_argument("--data-root", default=None, help="folder holding ferplus/ (default: $FERKIT_DATA or ../shared/data)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)

    from ferkit.config import load_config, run_config
    from ferkit.engine import Trainer
    from ferkit.engine.checkpoint import save_part

    root = Path(args.data_root or default_data_root()) / "ferplus"
    resume = (args.run_dir / "checkpoints" / "state.pt").is_file()
    overrides = [f"data.root={root}", *args.overrides]
    cfg = run_config(args.run_dir, args.overrides) if resume else load_config(PRESET, overrides)
    start = time.time()
    result = Trainer(cfg, args.run_dir, resume=resume).fit()
    out = args.run_dir / "trunk.safetensors"
    meta = save_part(args.run_dir / "checkpoints" / "best.safetensors", out, "features.",
                     trunk_of="resnet18", pretrained_on="FERPlus train (majority vote, 8 classes)",
                     recipe=f"python bench/make_ferplus_trunk.py (preset {PRESET})")
    valid = meta.get("metrics", {}).get("test") or result.get("test", {})
    print(json.dumps({"trunk": str(out), "valid_wa": valid.get("wa"), "valid_ua": valid.get("ua"),
                      "epochs": result.get("epochs_run"), "minutes_this_call": round((time.time() - start) / 60, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
