"""A convolution's bias added after the max-pool that follows it: the same values, a quarter of the adds.

``maxpool(conv(x) + b) == maxpool(conv(x)) + b`` holds exactly, also in floating point, for a
per-channel bias ``b`` and a max-pool within each channel: rounding ``a + b`` is monotone
non-decreasing in ``a``, so the window's largest rounded sum is the rounded sum of its largest
value (NaN propagates through both orders). A 2x2 pool leaves a quarter of the values, so the
bias is added to four times fewer elements.

Where this pays: PyTorch's cuDNN convolution adds its bias in a separate elementwise kernel over
the whole output (``aten::add_`` after ``cudnn_convolution``). On an H200 that kernel took 2.3 ms
of LeNet's 15.0 ms float32 forward pass at batch 50,000 (``docs/gpu_h200_consistency``), and the
values computed here are then bit-identical to the model's: the same convolution without bias,
then the same float additions on the values the pool keeps (``benchmarks/certify.py`` checks
this on the device: ``same_logits``). CPU convolutions (oneDNN) add the bias inside the
convolution, where it costs nothing; there the rewrite gives the same function up to the
rounding of that fused addition, and no gain.

The rewrite turns a ``Conv2d`` with a bias followed directly by a max-pool (exact
``nn.MaxPool2d`` without indices or ``nn.AdaptiveMaxPool2d``; no hooks on either) in a plain
``nn.Sequential`` into :class:`ConvWithoutBias` and ``nn.Sequential(pool, PoolBias)``; run
:func:`robust.pool_first.pool_before_relu` first to bring LeNet's ReLU behind its pools. Both
new modules read the convolution as it is at each call (its weight, bias and settings: a bias
removed or replaced later is followed) and register no parameters of their own, so the rewritten
model's ``named_parameters()`` lack the convolution's; state dicts and optimizers belong to the
original model. For inference only (certification): gradients are those of the same function,
but max-pooling may route them differently at windows whose sums tie only after rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from robust.pool_first import has_hooks, rewrite_sequentials

__all__ = ["ConvWithoutBias", "PoolBias", "bias_after_pool"]

_POOLS = (nn.MaxPool2d, nn.AdaptiveMaxPool2d)


class _ReadsConv(nn.Module):
    """Holds a convolution it reads at each call, referenced, not registered as a submodule."""

    def __init__(self, source: nn.Conv2d) -> None:
        super().__init__()
        self._source = (source,)  # a tuple: not a submodule


class ConvWithoutBias(_ReadsConv):
    """``source``'s convolution without its bias (``source`` as set at each call).

    Examples:
        >>> conv = nn.Conv2d(1, 2, 3)
        >>> x = torch.randn(1, 1, 5, 5)
        >>> torch.equal(ConvWithoutBias(conv)(x), conv._conv_forward(x, conv.weight, None))
        True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv(x) - bias``, computed as the convolution alone."""
        (source,) = self._source
        return source._conv_forward(x, source.weight, None)


class PoolBias(_ReadsConv):
    """Adds ``source``'s per-channel bias (as set at each call; nothing if it has none).

    The bias is cast to the values' dtype first, as autocast casts it for the convolution, so a
    bf16 forward adds in bf16 as the convolution would have.

    Shapes: (N, C, H, W) -> the same, in the input's memory layout.

    Examples:
        >>> conv = nn.Conv2d(1, 2, 3)
        >>> x = torch.randn(1, 2, 4, 4)
        >>> torch.equal(PoolBias(conv)(x), x + conv.bias.view(-1, 1, 1))
        True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus the bias of channel c on channel c."""
        (source,) = self._source
        if source.bias is None:
            return x
        return x + source.bias.to(x.dtype).view(-1, 1, 1)


def _conv_with_bias(module: nn.Module | None) -> bool:
    """Exactly ``nn.Conv2d`` (a subclass may compute something else), with a bias, no hooks."""
    return type(module) is nn.Conv2d and module.bias is not None and not has_hooks(module)


def _channel_pool(module: nn.Module | None) -> bool:
    """An exact 2-d max-pool (per channel) returning only its values, without hooks."""
    return type(module) in _POOLS and not module.return_indices and not has_hooks(module)


def _defer_biases(modules: list[nn.Module | None]) -> list[nn.Module | None]:
    """The list with each conv -> max-pool pair rewritten to add the bias after the pool."""
    modules = list(modules)
    for i in range(len(modules) - 1):
        conv, pool = modules[i], modules[i + 1]
        if _conv_with_bias(conv) and _channel_pool(pool):
            modules[i] = ConvWithoutBias(conv).train(conv.training)
            modules[i + 1] = nn.Sequential(pool, PoolBias(conv)).train(pool.training)
    return modules


def bias_after_pool(model: nn.Module) -> nn.Module:
    """``model`` with each conv -> max-pool pair of its sequential containers adding the bias last.

    Args:
        model: Any module; only plain ``nn.Sequential`` containers (nested ones included) change.

    Returns:
        ``model`` itself when nothing is rewritten; else a new ``nn.Sequential`` that computes
        ``model(x)``'s values (exactly, where the convolution adds its bias separately, as cuDNN
        does; up to the rounding of a fused bias on CPUs).

    Examples:
        >>> from robust.pool_first import pool_before_relu
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        >>> fast = bias_after_pool(pool_before_relu(net))
        >>> [type(m).__name__ for m in fast]
        ['ConvWithoutBias', 'Sequential', 'ReLU', 'Flatten']
        >>> x = torch.randn(4, 1, 8, 8)
        >>> torch.allclose(fast(x), net(x), atol=1e-6)
        True
        >>> bias_after_pool(net) is net  # the ReLU stands between: nothing to rewrite
        True
    """
    return rewrite_sequentials(model, _defer_biases)
