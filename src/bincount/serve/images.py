"""Image bytes from a request → the model's uint8 input, refusing what would hurt the server.

The size is read from the header and checked against the pixel cap before anything is decoded, so a
decompression bomb (a small file that decodes to gigabytes) costs nothing; a JPEG whose header claims more pixels
than its data can hold is refused as truncated, as a cut-off one is. The resize is the trainer's
evaluation transform, so the server sees photos the way evaluation did.
"""

from __future__ import annotations

import io
import struct
from http import HTTPStatus

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as F

from bincount.serve.errors import RequestError
from bincount.train import presets

FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
CORRUPT = (OSError, SyntaxError, ValueError, EOFError, struct.error)  # what Pillow raises on broken files


def decode_image(data: bytes, size: int, max_pixels: int, where: str) -> torch.Tensor:
    """uint8 RGB tensor [3, size, size]; `where` names the instance in error messages."""
    if not data:
        raise RequestError(f"{where}: the image is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise RequestError(f"{where}: not an image in a format this server reads "
                           f"({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as e:
        raise RequestError(f"{where}: refused as a decompression bomb ({e})", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    except CORRUPT as e:
        raise RequestError(f"{where}: the image header is truncated or corrupt ({e})") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise RequestError(f"{where}: the image is {width}×{height} px ({width * height / 1e6:.1f} Mpx), "
                               f"over this server's limit of {max_pixels / 1e6:.1f} Mpx",
                               HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        if image.format == "JPEG" and len(data) * 8 < _blocks(width, height):
            raise RequestError(f"{where}: the JPEG image is truncated or corrupt ({len(data)} bytes cannot hold "
                               f"{width}×{height} px)")
        try:
            rgb = image.convert("RGB")
        except CORRUPT as e:
            raise RequestError(f"{where}: the {image.format} image is truncated or corrupt ({e})") from None
    return presets.eval_transform(size)(F.pil_to_tensor(rgb))


def _blocks(width: int, height: int) -> int:
    """8×8 blocks in a full-resolution JPEG component. Huffman coding spends at least one bit on each (its DC
    coefficient has a code of its own), so fewer bytes than blocks / 8 cannot be a whole image: libjpeg would
    decode up to the end marker and fill the rest, and Pillow would not say so."""
    return -(-width // 8) * -(-height // 8)
