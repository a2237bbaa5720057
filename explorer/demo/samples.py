"""Write the sample scenes shipped in ``resources/samples`` (``python -m explorer.demo.samples``).

Fixed seeds, so the files are reproducible; each PNG gets a ``.txt`` with its scene caption.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from explorer.core.resources import samples_dir

from .scenes import make_scene

SAMPLES = {  # name -> (seed, size (H, W), number of objects)
    "scene-01": (11, (320, 448), 3),
    "scene-02": (22, (288, 288), 2),
    "scene-03": (33, (256, 384), 4),
    "scene-04": (44, (384, 256), 1),
}


def write_samples(folder: Path | None = None) -> list[Path]:
    folder = Path(folder or samples_dir())
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, (seed, size, n) in SAMPLES.items():
        scene = make_scene(seed, size=size, n_objects=n)
        path = folder / f"{name}.png"
        Image.fromarray(scene.image).save(path, optimize=True)
        (folder / f"{name}.txt").write_text(scene.caption + "\n")
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write_samples(Path(sys.argv[1]) if len(sys.argv) > 1 else None):
        print(p)
