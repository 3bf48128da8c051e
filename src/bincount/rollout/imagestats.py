"""What the drift report compares of a photo, computed from the model's own input square (`read_photo`), so the
server (for every request it logs) and the monitor (for every reference photo) measure the same pixels the same
way: its size and aspect ratio as sent, and the brightness (mean luma, 0-255), contrast (luma's standard
deviation) and sharpness (the variance of the luma's Laplacian, which blur lowers) of the square. About a
millisecond per photo at 224 px."""

from __future__ import annotations

import numpy as np

from bincount.model.preprocess import Photo

FEATURES = ("size", "aspect", "brightness", "contrast", "sharpness")
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)     # ITU-R BT.601


def measure(photo: Photo) -> dict[str, float]:
    """The logged facts of one photo: width and height in pixels, then brightness, contrast and sharpness. In
    numpy, single-threaded: torch would run these small operations on the thread pool the model's forward pass
    is using."""
    rgb = photo.square.numpy().astype(np.float32)
    luma = LUMA[0] * rgb[0] + LUMA[1] * rgb[1] + LUMA[2] * rgb[2]
    inner = luma[1:-1, 1:-1]
    laplacian = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4 * inner
    return {"width": photo.width, "height": photo.height, "brightness": round(float(luma.mean()), 3),
            "contrast": round(float(luma.std()), 3), "sharpness": round(float(laplacian.var()), 3)}


def features(facts: dict) -> dict[str, float]:
    """The compared features of logged facts: size in megapixels, aspect = width / height, and the three of the
    square as measured."""
    return {"size": facts["width"] * facts["height"] / 1e6, "aspect": facts["width"] / facts["height"],
            **{k: facts[k] for k in ("brightness", "contrast", "sharpness")}}
