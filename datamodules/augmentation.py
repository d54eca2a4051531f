"""Random crops and flips of whole training batches, drawn from a generator seeded per epoch.

The randomized-smoothing papers' CIFAR-10 code (Cohen et al. 2019, Salman et al. 2019, Jeong &
Shin 2020) augments each training image with torchvision's ``RandomCrop(32, padding=4)`` and
``RandomHorizontalFlip()``, which draw from the global generator of whichever process loads the
image: the augmentations then depend on the number of loader workers, and a run resumed at
epoch E (workers seeded afresh) does not see the uninterrupted run's. Here the same distribution
is drawn for a whole batch, after it reaches the model's device, from one generator seeded by
(seed, epoch, rank): the same at any ``num_workers``, and the same resumed or not.
"""

import torch
from torch import Tensor


def random_crop_flip(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Each image a random window of itself zero-padded by ``padding``, flipped with prob. 1/2.

    The distribution of ``RandomCrop(size, padding)`` then ``RandomHorizontalFlip()``: the
    window's top and left are uniform in ``[0, 2 * padding]``, the flip independent of them.

    Args:
        images: Batch ``(B, C, H, W)`` on any device.
        padding: Zero pixels added on each side before cropping, at least 0.
        generator: CPU generator the ``3 * B`` random numbers are drawn from, in the order
            (tops, lefts, flips).

    Returns:
        The augmented batch, same shape, dtype and device.

    Examples:
        >>> images = torch.arange(16.0).view(1, 1, 4, 4)
        >>> moved = random_crop_flip(images, 1, torch.Generator().manual_seed(0))
        >>> moved.shape, set(moved.flatten().tolist()) <= set(range(16))
        (torch.Size([1, 1, 4, 4]), True)
        >>> torch.equal(random_crop_flip(images, 0, torch.Generator()).sort(-1).values, images)
        True
    """
    batch, _, height, width = images.shape
    tops = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    lefts = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    # Rows and columns of each window in the padded image; a flip reads the columns backwards.
    rows = tops[:, None] + torch.arange(height)
    columns = lefts[:, None] + torch.where(
        flips[:, None], torch.arange(width - 1, -1, -1), torch.arange(width)
    )
    rows, columns = rows.to(images.device), columns.to(images.device)
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    every = torch.arange(batch, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[every, channels, rows[:, None, :, None], columns[:, None, None, :]]
