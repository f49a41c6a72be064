"""Write the demo model's photos: the scikit-image sample photos, split into training and held-out.

    python benchmarks/demo_data.py <folder>

writes <folder>/train/*.png and <folder>/heldout/*.png. The held-out colour photos are never shown to
the trainer; benchmarks/quality.py measures on them. scikit-image is a development dependency
(requirements-dev.txt), used only here.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

# Colour photos held out for quality measurements (never trained on).
HELDOUT = ("chelsea", "coffee", "rocket")
# Training: the other colour photos, and the grey ones (as RGB) for more natural texture.
TRAIN_COLOUR = ("astronaut", "hubble_deep_field", "immunohistochemistry", "retina")
TRAIN_GREY = ("camera", "brick", "grass", "gravel", "moon", "coins", "clock")


def photos():
    import skimage.data as data

    for name in HELDOUT + TRAIN_COLOUR + TRAIN_GREY:
        yield name, getattr(data, name)()
    left, right, _ = data.stereo_motorcycle()
    yield "motorcycle_left", left
    yield "motorcycle_right", right


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    args = parser.parse_args()
    from PIL import Image

    for split in ("train", "heldout"):
        os.makedirs(os.path.join(args.folder, split), exist_ok=True)
    for name, array in photos():
        array = np.asarray(array)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        split = "heldout" if name in HELDOUT else "train"
        Image.fromarray(array[..., :3].astype(np.uint8)).save(os.path.join(args.folder, split, f"{name}.png"))
        print(f"{split}/{name}.png {array.shape[1]}x{array.shape[0]}")


if __name__ == "__main__":
    main()
