"""Convolutions of one-channel inputs whose input gradient is a transposed convolution.

The input gradient of ``conv2d(x, w)`` is ``conv_transpose2d(grad, w)`` with the same stride,
padding and dilation (and the output padding that restores ``x``'s size). Autograd's
``convolution_backward`` computes exactly that, but on CPUs (oneDNN, PyTorch 2.14) it takes a path
that is 2 to 3 times slower than ``conv_transpose2d`` when the input has one channel: measured on 2
AMD EPYC cores, 1-to-20-channel 5x5 on 28x28 digits (LeNet's first layer) 55.8 against 26.5 ms for
128 images and 63.3 against 29.2 ms for 512; 1-to-32 3x3 (SmallCNN's) 2.0 to 3.0 times. With more
input channels both take the same path (equal results and times), so only one-channel convolutions
are rewritten. In a PGD attack on LeNet that backward pass was a quarter of the time.

The rewrite only replaces exact ``nn.Conv2d`` modules (not subclasses) with one input channel, one
group, numeric padding and zero padding mode, without hooks, inside plain ``nn.Sequential``
containers (:func:`robust.pool_first.rewrite_sequentials`; those held by other modules through
:func:`robust.pool_first.sequential_replacements`). The new module holds the same parameter
objects under the same names, so ``torch.func.functional_call`` and state dicts work unchanged.
Outputs are identical (the same ``conv2d``); input gradients agree up to float rounding (a
different summation order); weight gradients come from ``convolution_backward`` as before.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust.pool_first import has_hooks, rewrite_sequentials

__all__ = [
    "OneChannelConv2d",
    "is_rewritable",
    "one_channel_convs_transposed",
    "replace_one_channel_convs",
]


class _InputGradByTransposedConv(torch.autograd.Function):
    """``conv2d`` whose backward computes the input gradient with ``conv_transpose2d``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> Tensor:
        out = F.conv2d(x, weight, bias, stride, padding, dilation)
        # the input itself is only needed for the weight gradient
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.geometry = (x.shape, stride, padding, dilation, bias is not None)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        shape, stride, padding, dilation, has_bias = ctx.geometry
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # the rows and columns that the forward's stride skipped at the end come back as zeros
            kernel = weight.shape[2:]
            output_padding = [
                shape[2 + i]
                - (
                    (grad.shape[2 + i] - 1) * stride[i]
                    - 2 * padding[i]
                    + dilation[i] * (kernel[i] - 1)
                    + 1
                )
                for i in range(2)
            ]
            grad_x = F.conv_transpose2d(
                grad, weight, None, stride, padding, output_padding, 1, dilation
            )
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                grad,
                x,
                weight,
                None,
                stride,
                padding,
                dilation,
                False,
                [0, 0],
                1,
                [False, True, False],
            )[1]
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


class OneChannelConv2d(nn.Module):
    """A one-input-channel ``nn.Conv2d`` (shared parameters) with the faster input gradient.

    Args:
        conv: The convolution; must satisfy :func:`is_rewritable`.

    Examples:
        >>> import torch
        >>> conv = nn.Conv2d(1, 4, 3, stride=2)
        >>> fast = OneChannelConv2d(conv)
        >>> fast.weight is conv.weight, [name for name, _ in fast.named_parameters()]
        (True, ['weight', 'bias'])
        >>> x = torch.rand(2, 1, 9, 9, requires_grad=True)
        >>> (g_fast,) = torch.autograd.grad(fast(x).sum(), x)
        >>> (g_conv,) = torch.autograd.grad(conv(x).sum(), x)
        >>> torch.allclose(g_fast, g_conv, atol=1e-6)
        True
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not is_rewritable(conv):
            raise ValueError(f"OneChannelConv2d takes a plain one-channel nn.Conv2d, not {conv}")
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride: tuple[int, int] = tuple(conv.stride)  # type: ignore[assignment]
        self.padding: tuple[int, int] = tuple(conv.padding)  # type: ignore[assignment]
        self.dilation: tuple[int, int] = tuple(conv.dilation)  # type: ignore[assignment]
        self.training = conv.training

    def forward(self, x: Tensor) -> Tensor:
        """``conv(x)``; its input gradient by ``conv_transpose2d``."""
        return _InputGradByTransposedConv.apply(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation
        )

    def extra_repr(self) -> str:
        """Output channels and kernel size, as ``print(model)`` shows them."""
        return f"out_channels={self.weight.shape[0]}, kernel_size={tuple(self.weight.shape[2:])}"


def is_rewritable(module: nn.Module | None) -> bool:
    """Exactly ``nn.Conv2d``, one input channel, one group, numeric zero padding, no hooks."""
    return (
        type(module) is nn.Conv2d
        and module.in_channels == 1
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and not has_hooks(module)
    )


def replace_one_channel_convs(modules: list[nn.Module | None]) -> list[nn.Module | None]:
    """The list with every rewritable convolution as a :class:`OneChannelConv2d`."""
    return [OneChannelConv2d(m) if is_rewritable(m) else m for m in modules]


def one_channel_convs_transposed(model: nn.Module) -> nn.Module:
    """``model`` with its one-channel convolutions as :class:`OneChannelConv2d`.

    Args:
        model: Any module; only plain ``nn.Sequential`` containers (nested ones included) change.

    Returns:
        ``model`` itself when nothing is replaced; else a new ``nn.Sequential`` holding the same
        parameters under the same names that computes exactly ``model(x)``, with input gradients
        equal up to float rounding.

    Examples:
        >>> import torch
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
        >>> fast = one_channel_convs_transposed(net)
        >>> [type(m).__name__ for m in fast]
        ['OneChannelConv2d', 'ReLU', 'Conv2d']
        >>> x = torch.randn(4, 1, 8, 8)
        >>> torch.equal(fast(x), net(x)), fast[2] is net[2]
        (True, True)
        >>> dict(fast.named_parameters()).keys() == dict(net.named_parameters()).keys()
        True
    """
    return rewrite_sequentials(model, replace_one_channel_convs)
