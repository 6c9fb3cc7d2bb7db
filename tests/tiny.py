"""A tiny in-memory dataset for engine tests: class = position of a bright square, plus noise."""
from pathlib import Path

import numpy as np
from PIL import Image

from ferkit.data.base import FaceDataset, FaceRecord


class TinyFaces(FaceDataset):
    name = "tiny"

    def __init__(self, n: int = 64, k: int = 4, size: int = 32, seed: int = 0, split: str = "train"):
        rng = np.random.default_rng(seed)
        labels = np.arange(n) % k
        self.images = []
        for y in labels:
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            r, c = divmod(int(y), 2)
            img[r * size // 2: r * size // 2 + size // 3, c * size // 2: c * size // 2 + size // 3] = 220
            self.images.append(img)
        occl = np.arange(n) % 3 == 0
        records = [FaceRecord(None, int(y), f"tiny:{i}", subject=f"s{i % 5}", meta={"occluded": bool(o)})
                   for i, (y, o) in enumerate(zip(labels, occl))]
        super().__init__(records, [f"c{i}" for i in range(k)], split=split)

    def load(self, index):
        return {"image": Image.fromarray(self.images[index]), "label": self.records[index].label, "index": index}

    def subsets(self):
        return {"occluded": self.meta_column("occluded", False).astype(bool)}


def write_imagefolder(root: Path, sizes=(("train", 64, 0), ("test", 24, 1)), size: int = 48) -> Path:
    """Save TinyFaces splits as ``root/<split>/<class>/<i>.png`` (an on-disk dataset for subprocess tests)."""
    for split, n, seed in sizes:
        ds = TinyFaces(n, seed=seed, size=size)
        for i in range(n):
            s = ds.load(i)
            d = Path(root) / split / ds.class_names[s["label"]]
            d.mkdir(parents=True, exist_ok=True)
            s["image"].save(d / f"{i:03d}.png")
    return Path(root)
