"""``lightning_gradguard.lightning.GradGuard``: the callback, spelled for the unified ``lightning`` package.

It is the same class as :class:`lightning_gradguard.GradGuard`, which derives from both
``pytorch_lightning.Callback`` and ``lightning.pytorch.Callback`` when both are installed; this
module exists so that code written against ``lightning.pytorch`` can say so.

Example::

    >>> import lightning_gradguard
    >>> from lightning_gradguard.lightning import GradGuard
    >>> GradGuard is lightning_gradguard.GradGuard
    True
"""

from lightning_gradguard.integrations.lightning import GradGuard

__all__ = ["GradGuard"]
