"""Image transforms shared by training, evaluation and inference (torchvision reference style).

Augmentation happens on the training split only; evaluation and serving use the same
deterministic resize + centre crop, so a served prediction sees exactly what evaluation saw.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2 as T

# Resize to image_size / CROP_RATIO, then centre-crop image_size: the usual ImageNet evaluation.
CROP_RATIO = 0.875


class TrainPreset:
    def __init__(self, image_size: int, mean, std, hflip: bool = True):
        steps = [T.PILToTensor(), T.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True)]
        if hflip:
            steps.append(T.RandomHorizontalFlip())
        steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
        self.transforms = T.Compose(steps)

    def __call__(self, image):
        return self.transforms(image)


class EvalPreset:
    def __init__(self, image_size: int, mean, std):
        self.transforms = T.Compose(
            [
                T.PILToTensor(),
                T.Resize(round(image_size / CROP_RATIO), antialias=True),
                T.CenterCrop(image_size),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(mean, std),
            ]
        )

    def __call__(self, image):
        return self.transforms(image)
