"""Training-time augmentation, in the style of torchvision's reference presets.

The image cache already holds each photo as the model's input square (the exported model's preprocessing), so
training only augments: workers transform uint8 tensors, and normalization happens on the training device
with the exported model's own `Preprocessing.normalize`, so batches cross process boundaries and the PCIe
bus at a quarter of the size.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

AUGMENTS = ("none", "flip", "counting", "counting-strong")


class RandomRot90(v2.Transform):
    """A random number of quarter turns: on the square input they move items without resampling or cutting any."""

    def make_params(self, flat_inputs: list) -> dict:
        return {"k": int(torch.randint(4, ()))}

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        return torch.rot90(inpt, params["k"], dims=(-2, -1))


def train_transform(augment: str) -> v2.Transform:
    """`flip` is the seed's horizontal flip; `counting` adds what leaves the count unchanged.

    A bin seen from above has no up, left or colour that matters: all eight flips and quarter turns, a shuffle of
    the colour channels and mild light changes keep the count. Small free rotations are left out: they resample
    and blacken the corners, where items near the wall may lie.
    `counting-strong` keeps the count too but changes more of the look: stronger light and colour, blur or
    sharpening (the pool mixes sharp originals with photos published at 224 px and JPEG quality 75), grey.
    """
    steps: list[v2.Transform] = []
    if augment in ("flip", "counting", "counting-strong"):
        steps.append(v2.RandomHorizontalFlip())
    if augment == "counting":
        steps += [v2.RandomVerticalFlip(), RandomRot90(), v2.RandomChannelPermutation(),
                  v2.ColorJitter(brightness=0.2, contrast=0.2)]
    if augment == "counting-strong":
        steps += [v2.RandomVerticalFlip(), RandomRot90(), v2.RandomChannelPermutation(),
                  v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.3, hue=0.03),
                  v2.RandomApply([v2.GaussianBlur(5, sigma=(0.3, 1.5))], p=0.25),
                  v2.RandomAdjustSharpness(2.0, p=0.25), v2.RandomGrayscale(p=0.1)]
    return v2.Compose(steps) if steps else v2.Identity()
