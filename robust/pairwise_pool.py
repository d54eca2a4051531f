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

__all__ = ["PairwiseMaxPool2d", "is_plain_2x2_max_pool", "pairwise_max_pool"]


class PairwiseMaxPool2d(nn.Module):
    """``nn.MaxPool2d(2)``'s values as two elementwise maxima (a last odd row or column is dropped).

    With a ``source`` pool, that pool's values as it is set at each call: an
    ``nn.AdaptiveMaxPool2d`` is pairwise where the input is twice its output size (its windows
    are then 2x2 with stride 2), and a pool whose settings no longer allow it (changed in place
    after the rewrite) runs itself. The source is referenced, not registered as a submodule.

    Shapes: (..., H, W) -> (..., H // 2, W // 2), in the input's memory layout. An input with
    H or W below 2 gives an empty output where ``nn.MaxPool2d`` raises.

    Args:
        source: The ``nn.MaxPool2d`` or ``nn.AdaptiveMaxPool2d`` replaced; ``None``: a 2x2 pool.

    Examples:
        >>> x = torch.randn(3, 4, 7, 6)
        >>> torch.equal(PairwiseMaxPool2d()(x), nn.MaxPool2d(2)(x))
        True
        >>> adaptive = nn.AdaptiveMaxPool2d(3)
        >>> torch.equal(PairwiseMaxPool2d(adaptive)(x[..., :6]), adaptive(x[..., :6]))
        True
    """

    def __init__(self, source: nn.MaxPool2d | nn.AdaptiveMaxPool2d | None = None) -> None:
        super().__init__()
        self._source = (source,) if source is not None else ()  # a tuple: not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The maximum of each 2x2 window of the last two dimensions (or the source's result)."""
        if self._source:
            (source,) = self._source
            if not _replaceable(source):  # changed in place since the rewrite
                return source(x)
            if isinstance(source, nn.AdaptiveMaxPool2d):
                height, width = _pair(source.output_size)
                if (2 * (height or 0), 2 * (width or 0)) != tuple(x.shape[-2:]):
                    return F.adaptive_max_pool2d(x, source.output_size)
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]  # floor mode
        rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])  # each window's two rows
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])  # ... then its two columns


def _pair(value: int | tuple | None) -> tuple:
    return tuple(value) if isinstance(value, tuple | list) else (value, value)


def is_plain_2x2_max_pool(module: nn.Module | None) -> bool:
    """Exactly ``nn.MaxPool2d``: 2x2, stride 2, no padding, dilation, ceil mode, indices or hooks.

    Examples:
        >>> is_plain_2x2_max_pool(nn.MaxPool2d(2)), is_plain_2x2_max_pool(nn.MaxPool2d(3))
        (True, False)
    """
    return (
        type(module) is nn.MaxPool2d
        and not has_hooks(module)
        and not module.return_indices
        and _pair(module.kernel_size) == (2, 2)
        and _pair(module.stride) == (2, 2)
        and _pair(module.padding) == (0, 0)
        and _pair(module.dilation) == (1, 1)
        and not module.ceil_mode
    )


def _replaceable(module: nn.Module | None) -> bool:
    """A plain 2x2 ``nn.MaxPool2d`` or an ``nn.AdaptiveMaxPool2d``: exact types, no indices or hooks."""
    if type(module) is nn.AdaptiveMaxPool2d:
        return not has_hooks(module) and not module.return_indices
    return is_plain_2x2_max_pool(module)


def _replacement(module: nn.Module | None) -> nn.Module | None:
    """The pairwise pool computing ``module``'s values (in its training mode), or ``module``."""
    if not _replaceable(module):
        return module
    return PairwiseMaxPool2d(module).train(module.training)


def pairwise_max_pool(model: nn.Module) -> nn.Module:
    """``model`` with each plain 2x2 or adaptive max-pool of its sequential containers pairwise.

    Each replacement follows its pool's settings at every call (a pool changed in place later
    runs itself), so the rewritten model keeps computing ``model(x)``'s values.

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
