"""Image bytes from a request → the model's uint8 input, through the exported model's own preprocessing
(`bincount.model.preprocess`), so the server sees a photo exactly as evaluation did; what cannot be read is the
client's error: 413 for an image over the pixel cap, 400 for anything else."""

from __future__ import annotations

from http import HTTPStatus

from bincount.model.preprocess import ImageError, Photo, read_photo
from bincount.serve.errors import RequestError


def decode_image(data: bytes, size: int, max_pixels: int, where: str) -> Photo:
    """The model's input square (uint8 RGB [3, size, size]) and the photo's size; `where` names the instance in
    error messages."""
    try:
        return read_photo(data, size, max_pixels)
    except ImageError as e:
        status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if e.reason == "too-large" else HTTPStatus.BAD_REQUEST
        raise RequestError(f"{where}: {e}", status) from None
