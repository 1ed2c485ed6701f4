"""``eval_mode``: run a block with a module in evaluation mode, then restore its mode.

Encoding, caching token states, mining and dev evaluation all run a model that may be in
the middle of training; leaving it in evaluation mode afterwards (dropout off) would quietly
change the rest of the training, and an exception must not leave it there either.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@contextmanager
def eval_mode(module: ModuleT) -> Iterator[ModuleT]:
    """``module.eval()`` for the block; on leaving it, training mode again if it was on.

    A model that is in evaluation mode throughout (every inference call) is left untouched:
    setting and restoring the mode walks every submodule twice, 0.65 ms per query for MiniLM.
    """
    if not any(m.training for m in module.modules()):
        yield module
        return
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
