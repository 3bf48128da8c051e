"""Image bytes from a request → the model's uint8 input, through the exported model's own preprocessing
(`bincount.model.preprocess`), so the server sees a photo exactly as evaluation did; what cannot be read is the
client's error: 413 for an image over the pixel cap, 400 for anything else."""

from __future__ import annotations

from http import HTTPStatus

import torch

from bincount.model.preprocess import ImageError, read_image
from bincount.serve.errors import RequestError


def decode_image(data: bytes, size: int, max_pixels: int, where: str) -> torch.Tensor:
    """uint8 RGB tensor [3, size, size]; `where` names the instance in error messages."""
    try:
        return read_image(data, size, max_pixels)
    except ImageError as e:
        status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if e.reason == "too-large" else HTTPStatus.BAD_REQUEST
        raise RequestError(f"{where}: {e}", status) from None
