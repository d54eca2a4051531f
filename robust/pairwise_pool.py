"""2x2 max-pooling as two elementwise maxima: the same values, without the pooling kernel's indices.

``F.max_pool2d(x, 2)`` on a CPU runs ``max_pool2d_with_indices`` even without gradients: it
writes an int64 index per output and walks each window in a loop. The same values come from
two elementwise maxima of strided views, first of row pairs, then of column pairs, which
vectorize along the contiguous dimension in either memory layout. Measured on 2 CPU cores
(torch 2.14, batch 400): LeNet's first pooling (20 x 24 x 24) took 1.40 ms channels-last and
10.2 ms contiguous; the two maxima take 0.78 and 1.03 ms.

Max-pooling only selects one of its inputs, and so does ``torch.maximum``; both propagate NaN.
The values are therefore equal, up to the sign of a zero in a window holding both -0.0 and +0.0,
which no comparison, sum or argmax can tell apart. Gradients differ at ties: ``torch.maximum``
splits the gradient between equal inputs where max-pooling gives it to the first. On MNIST, whose
background makes ties common, attack gradients would change, so the rewrite is for inference:
:class:`robust.smoothing.Smooth` evaluates f with it on CPUs.

The rewrite replaces exact ``nn.MaxPool2d`` modules (not subclasses, no hooks of their own) with a
2x2 window, stride 2, no padding, no dilation, no ``ceil_mode`` and no ``return_indices``, and
exact ``nn.AdaptiveMaxPool2d`` modules (pairwise where the input is twice the output size), in
plain ``nn.Sequential`` containers (:func:`robust.pool_first.rewrite_sequentials`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robust.pool_first import has_hooks, rewrite_sequentials

__all__ = ["PairwiseMaxPool2d", "pairwise_max_pool"]


class PairwiseMaxPool2d(nn.Module):
    """``nn.MaxPool2d(2)``'s values as two elementwise maxima (a last odd row or column is dropped).

    With ``output_size``, ``nn.AdaptiveMaxPool2d(output_size)``'s values instead: its windows are
    2x2 with stride 2 exactly when the input is twice the output size; other inputs go to
    ``F.adaptive_max_pool2d``.

    Shapes: (..., H, W) -> (..., H // 2, W // 2), in the input's memory layout. An input with
    H or W below 2 gives an empty output where ``nn.MaxPool2d`` raises.

    Args:
        output_size: ``None`` (``nn.MaxPool2d(2)``) or an adaptive pool's output size.

    Examples:
        >>> x = torch.randn(3, 4, 7, 6)
        >>> torch.equal(PairwiseMaxPool2d()(x), nn.MaxPool2d(2)(x))
        True
        >>> torch.equal(PairwiseMaxPool2d(3)(x[..., :6]), nn.AdaptiveMaxPool2d(3)(x[..., :6]))
        True
    """

    def __init__(self, output_size: int | tuple[int | None, int | None] | None = None) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The maximum of each 2x2 window of the last two dimensions."""
        if self.output_size is not None:
            height, width = _pair(self.output_size)
            if (2 * (height or 0), 2 * (width or 0)) != tuple(x.shape[-2:]):
                return F.adaptive_max_pool2d(x, self.output_size)
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]  # floor mode
        rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])  # each window's two rows
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])  # ... then its two columns


def _pair(value: int | tuple | None) -> tuple:
    return tuple(value) if isinstance(value, tuple | list) else (value, value)


def _replacement(module: nn.Module | None) -> nn.Module | None:
    """The pairwise pool computing ``module``'s values, or ``module`` itself."""
    if _is_plain_2x2(module):
        return PairwiseMaxPool2d()
    if type(module) is nn.AdaptiveMaxPool2d and not module.return_indices:
        return module if has_hooks(module) else PairwiseMaxPool2d(module.output_size)
    return module


def _is_plain_2x2(module: nn.Module | None) -> bool:
    """Exactly ``nn.MaxPool2d`` with a 2x2 window, stride 2 and nothing else set; no hooks."""
    return (
        type(module) is nn.MaxPool2d
        and _pair(module.kernel_size) == (2, 2)
        and _pair(module.stride) == (2, 2)
        and _pair(module.padding) == (0, 0)
        and _pair(module.dilation) == (1, 1)
        and not module.ceil_mode
        and not module.return_indices
        and not has_hooks(module)
    )


def pairwise_max_pool(model: nn.Module) -> nn.Module:
    """``model`` with each plain 2x2 or adaptive max-pool of its sequential containers pairwise.

    Args:
        model: Any module; only plain ``nn.Sequential`` containers (nested ones included) change.

    Returns:
        ``model`` itself when nothing is replaced; else a new ``nn.Sequential`` holding the same
        other submodules (shared parameters, the same names) that computes ``model(x)``'s values.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.ReLU(), nn.MaxPool2d(3))
        >>> [type(m).__name__ for m in pairwise_max_pool(net)]
        ['Conv2d', 'PairwiseMaxPool2d', 'ReLU', 'MaxPool2d']
        >>> x = torch.randn(2, 1, 16, 16)
        >>> torch.equal(pairwise_max_pool(net)(x), net(x))
        True
    """
    return rewrite_sequentials(model, lambda modules: [_replacement(m) for m in modules])
