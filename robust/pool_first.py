"""ReLU after max-pooling instead of before: the same function, on a quarter of the values.

``maxpool(relu(x)) == relu(maxpool(x))`` holds exactly, also in floating point: ReLU is monotone
non-decreasing, so the largest of a window's rectified values is the rectified largest value
(max-pooling only selects one of its inputs, and NaN propagates through both orders). The values
are equal; only the sign of a zero may differ (a window of -1 and -0.0 gives +0 one way and -0
the other), which no comparison, sum or argmax can tell apart. A 2x2 pool
leaves a quarter of the values, so the ReLU (and, in training-free uses such as attacks and
certification, its backward) touches four times fewer elements. On LeNet, whose first ReLU runs on
its largest activation, this is where a CPU forward pass spent a fifth of its time.

The rewrite only reorders exact ``nn.ReLU`` and max-pool modules (not subclasses, nor pools
both padded and dilated, whose windows can be all padding) of ``nn.Sequential`` containers whose
``forward`` is ``nn.Sequential``'s own, where none of them has hooks of its own; everything else
is left as it is. An in-place ReLU then rectifies the
pooled values in place instead of the tensor it was given. Parameters and buffers are shared,
not copied, and keep their names, so ``torch.func.functional_call`` and state dicts work unchanged.
Gradients agree except at exact ties at zero, where both orders pick a valid subgradient.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator

from torch import nn

__all__ = [
    "HOOK_ATTRIBUTES",
    "children_replaced",
    "has_hooks",
    "pool_before_relu",
    "rewrite_sequentials",
    "sequential_replacements",
    "swap_relu_pool",
]

ListRewrite = Callable[[list[nn.Module | None]], list[nn.Module | None]]
"""Maps a container's modules to a list of the same length."""

HOOK_ATTRIBUTES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
"""A module's own hook dictionaries (``nn.Module`` internals)."""


_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward, forward-pre, backward or backward-pre hooks of its own."""
    return any(getattr(module, name, None) for name in HOOK_ATTRIBUTES)


def _is_relu(module: nn.Module | None) -> bool:
    """Exactly ``nn.ReLU`` (a subclass may compute something else), without hooks."""
    return type(module) is nn.ReLU and not has_hooks(module)


def _is_pool(module: nn.Module | None) -> bool:
    """Exactly a max-pool returning only its values (indices would change the output), no hooks.

    Not one both padded and dilated: its windows may then lie wholly in the padding, where the
    pool gives -inf, and the ReLU after it 0 (``relu(maxpool(x))``) where the model's order
    keeps -inf (``maxpool(relu(x))``). Adaptive pools never have an empty window.
    """
    if type(module) not in _POOLS or module.return_indices or has_hooks(module):
        return False
    padding, dilation = getattr(module, "padding", 0), getattr(module, "dilation", 1)
    padded = any(p != 0 for p in _pair(padding))
    return not (padded and any(d != 1 for d in _pair(dilation)))


def _pair(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def _plain_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential`` running its modules in order: its own forward, no hooks of its own.

    Subclasses such as LeNet qualify when they add no parameters or buffers of their own (a
    rewrite returns a plain ``nn.Sequential``, which would drop them).
    """
    return (
        isinstance(module, nn.Sequential)
        and type(module).forward is nn.Sequential.forward
        and type(module).__iter__ is nn.Sequential.__iter__
        and not module._parameters
        and not module._buffers
        and not has_hooks(module)
    )


def rewrite_sequentials(model: nn.Module, rewrite: ListRewrite) -> nn.Module:
    """``model`` with ``rewrite`` applied to the module list of each plain ``nn.Sequential``.

    Nested containers are rewritten first. A container whose modules all stay the same objects is
    returned as it is; else a new ``nn.Sequential`` with the same names holds the new list
    (parameters shared, not copied), with the container's own training flag.

    Args:
        model: Any module; only plain ``nn.Sequential`` containers (nested ones included) change.
        rewrite: Maps a container's modules to a list of the same length.

    Returns:
        ``model`` itself or its rewritten copy.

    Examples:
        >>> net = nn.Sequential(nn.Identity(), nn.Sequential(nn.Identity(), nn.ReLU()))
        >>> flip = rewrite_sequentials(net, lambda modules: modules[::-1])
        >>> [type(m).__name__ for m in flip], [type(m).__name__ for m in flip[0]]
        (['Sequential', 'Identity'], ['ReLU', 'Identity'])
    """
    if not _plain_sequential(model):
        return model
    names, old = list(model._modules), list(model._modules.values())
    modules = rewrite([rewrite_sequentials(m, rewrite) if m is not None else m for m in old])
    if all(new is before for new, before in zip(modules, old, strict=True)):
        return model
    rewritten = nn.Sequential(OrderedDict(zip(names, modules, strict=True)))
    rewritten.training = model.training  # the container's flag only: the shared modules keep theirs
    return rewritten


def sequential_replacements(
    model: nn.Module, rewrite: ListRewrite
) -> list[tuple[nn.Module, str, nn.Module]]:
    """Rewritten networks for the children a module declares it only calls whole.

    A module with a ``forward`` of its own (a LightningModule holding ``self.model``) may use a
    child sequential in ways a rewrite would break (slicing it, reading an attribute of it), so
    only a class that declares ``whole_sequentials`` (the names of children its ``forward`` calls
    as a whole and nothing else), in the class that defines its ``forward``, takes part. Returns
    the ``(model, name, rewritten)`` triples that :func:`children_replaced` puts in place for the
    duration of a call, so the module's own ``forward``, attributes and hooks stay the caller's
    (a copy of the module would count queries or cache values in the copy).

    Examples:
        >>> class Holder(nn.Module):
        ...     whole_sequentials = ("net",)  # forward is self.net(x)
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
        ...     def forward(self, x):
        ...         return self.net(x)
        >>> holder = Holder()
        >>> [(type(h).__name__, name, [type(m).__name__ for m in new])
        ...  for h, name, new in sequential_replacements(holder, swap_relu_pool)]
        [('Holder', 'net', ['MaxPool2d', 'ReLU'])]
        >>> with children_replaced(sequential_replacements(holder, swap_relu_pool)):
        ...     type(holder.net[0]).__name__
        'MaxPool2d'
        >>> type(holder.net[0]).__name__
        'ReLU'
        >>> class Slicer(Holder):
        ...     def forward(self, x):  # its own forward: Holder's declaration does not hold
        ...         return self.net[:1](x)
        >>> sequential_replacements(Slicer(), swap_relu_pool)
        []
    """
    declaring = next((c for c in type(model).__mro__ if "whole_sequentials" in vars(c)), None)
    if declaring is None or type(model).forward is not declaring.forward:
        return []
    found = []
    for name in declaring.whole_sequentials:
        child = model._modules.get(name)
        if child is not None and _plain_sequential(child):
            new = rewrite_sequentials(child, rewrite)
            if new is not child:
                found.append((model, name, new))
    return found


@contextlib.contextmanager
def children_replaced(replacements: list[tuple[nn.Module, str, nn.Module]]) -> Iterator[None]:
    """Put each ``(holder, name, module)`` in place as ``holder.<name>``; restore them after."""
    old = [(holder, name, holder._modules[name]) for holder, name, _ in replacements]
    try:
        for holder, name, module in replacements:
            holder._modules[name] = module
        yield
    finally:
        for holder, name, module in reversed(old):
            holder._modules[name] = module


def swap_relu_pool(modules: list[nn.Module | None]) -> list[nn.Module | None]:
    """The list with every ReLU -> max-pool pair swapped (left to right, pairs not overlapping)."""
    modules, i = list(modules), 0
    while i + 1 < len(modules):
        if _is_relu(modules[i]) and _is_pool(modules[i + 1]):
            modules[i], modules[i + 1] = modules[i + 1], modules[i]
            i += 2
        else:
            i += 1
    return modules


def pool_before_relu(model: nn.Module) -> nn.Module:
    """``model`` with every ReLU -> max-pool pair of its sequential containers swapped.

    Args:
        model: Any module; only plain ``nn.Sequential`` containers (nested ones included) change.

    Returns:
        ``model`` itself when nothing is swapped; else a new ``nn.Sequential`` holding the same
        submodules (shared parameters, the same parameter names) that computes exactly
        ``model(x)``.

    Examples:
        >>> import torch
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        >>> fast = pool_before_relu(net)
        >>> [type(m).__name__ for m in fast]
        ['Conv2d', 'MaxPool2d', 'ReLU', 'Flatten']
        >>> x = torch.randn(4, 1, 8, 8)
        >>> torch.equal(fast(x), net(x)), fast[0] is net[0]
        (True, True)
        >>> pool_before_relu(nn.Linear(2, 2)).__class__.__name__
        'Linear'
    """
    return rewrite_sequentials(model, swap_relu_pool)
