"""Run a model in eval mode for a while without losing any submodule's own train/eval flag."""

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's previous mode (mixed modes too).

    ``model.train(previous)`` would not do: it sets every submodule alike, losing e.g. a frozen
    batch-norm layer kept in eval mode inside a model that is training.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
