"""Image transforms, in the style of torchvision's reference presets.

Workers only resize and augment uint8 tensors; the float conversion and ImageNet normalization happen on the
training device (`to_input`), so batches cross process boundaries and the PCIe bus at a quarter of the size.
The whole photo is stretched to a square: a crop could cut items out of the bin and change its count.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("none", "flip", "counting")
RESIZE_MODE = "stretch"


class RandomRot90(v2.Transform):
    """A random number of quarter turns: on the square input they move items without resampling or cutting any."""

    def make_params(self, flat_inputs: list) -> dict:
        return {"k": int(torch.randint(4, ()))}

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        return torch.rot90(inpt, params["k"], dims=(-2, -1))


def train_transform(size: int, augment: str) -> v2.Transform:
    """`flip` is the seed's horizontal flip; `counting` adds what leaves the count unchanged.

    A bin seen from above has no up, left or colour that matters: all eight flips and quarter turns, a shuffle of
    the colour channels and mild light changes keep the count. Small free rotations are left out: they resample
    and blacken the corners, where items near the wall may lie.
    """
    steps: list[v2.Transform] = [v2.Resize((size, size), antialias=True)]
    if augment in ("flip", "counting"):
        steps.append(v2.RandomHorizontalFlip())
    if augment == "counting":
        steps += [v2.RandomVerticalFlip(), RandomRot90(), v2.RandomChannelPermutation(),
                  v2.ColorJitter(brightness=0.2, contrast=0.2)]
    return v2.Compose(steps)


def eval_transform(size: int) -> v2.Transform:
    return v2.Resize((size, size), antialias=True)


def to_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 NCHW batch → normalized float batch on `device`."""
    x = images.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = x.sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
