"""A photo's bytes → the model's uint8 input: the one function that training's cache, evaluate, the audit and
the server all call, so the same photo becomes the same tensor everywhere.

The size is read from the header and checked against the pixel cap before anything is decoded, so a
decompression bomb (a small file that decodes to gigabytes) costs nothing; a JPEG whose header claims more pixels
than its data can hold is refused as truncated, as a cut-off one is. JPEGs are decoded at the smallest
DCT scale that still covers the output (Pillow's draft mode), which makes a 12-megapixel phone photo cheap.
The whole photo is then stretched to a square: a crop could cut items out of the bin and change its count.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as F

from bincount.errors import BincountError

FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
RESIZE = "stretch"
CORRUPT = (OSError, SyntaxError, ValueError, EOFError, struct.error)  # what Pillow raises on broken files


class ImageError(BincountError):
    """A photo that cannot become a model input; `reason` is a short code to count failures by."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Photo:
    square: torch.Tensor                        # uint8 RGB [3, size, size], the model's input
    width: int                                  # of the photo as sent
    height: int


def read_image(data: bytes, size: int, max_pixels: int | None = None) -> torch.Tensor:
    """uint8 RGB tensor [3, size, size]."""
    return read_photo(data, size, max_pixels).square


def read_photo(data: bytes, size: int, max_pixels: int | None = None) -> Photo:
    """The model's input square and the photo's own size."""
    if not data:
        raise ImageError("empty", "the image is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError("not-an-image", f"not an image in a readable format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as e:
        raise ImageError("too-large", f"refused as a decompression bomb ({e})") from None
    except CORRUPT as e:
        raise ImageError("corrupt", f"the image header is truncated or corrupt ({e})") from None
    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageError("too-large", f"the image is {width}×{height} px ({width * height / 1e6:.1f} Mpx), "
                                          f"over the limit of {max_pixels / 1e6:.1f} Mpx")
        if image.format == "JPEG" and len(data) * 8 < _blocks(width, height):
            raise ImageError("corrupt", f"the JPEG image is truncated or corrupt ({len(data)} bytes cannot hold "
                                        f"{width}×{height} px)")
        try:
            image.draft("RGB", (size, size))
            rgb = np.array(image.convert("RGB"))
        except CORRUPT as e:
            raise ImageError("corrupt", f"the {image.format} image is truncated or corrupt ({e})") from None
    return Photo(resize(torch.from_numpy(rgb).permute(2, 0, 1), size), width, height)


def _blocks(width: int, height: int) -> int:
    """8×8 blocks in a full-resolution JPEG component. Huffman coding spends at least one bit on each (its DC
    coefficient has a code of its own), so fewer bytes than blocks / 8 cannot be a whole image: libjpeg would
    decode up to the end marker and fill the rest, and Pillow would not say so."""
    return -(-width // 8) * -(-height // 8)


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, H, W] → uint8 [3, size, size], antialiased."""
    return F.resize(image, [size, size], antialias=True).contiguous()
