"""Run a model in eval mode for a while without losing any submodule's own train/eval flag."""

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's previous mode (mixed modes too).

    ``model.train(previous)`` would not do: it sets every submodule alike, losing e.g. a frozen
    batch-norm layer kept in eval mode inside a model that is training.

    Examples:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = model[1].eval()  # a frozen batch-norm layer inside a training model
        >>> with eval_mode(model):
        ...     print(model.training, model[1].training)
        False False
        >>> model.training, model[0].training, model[1].training
        (True, True, False)
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
