"""The library's one exception family, and its one warning category.

Every error the guard raises on purpose is a :class:`GradGuardError`, so a training script can catch
the whole family with one ``except``. :class:`NonFiniteGradientError` carries the
:class:`~lightning_gradguard.events.GradEvent` that caused it. Every warning is a
:class:`GradGuardWarning`, located by :func:`warn` at the user's line, never the library's.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_gradguard.events import GradEvent

__all__ = ["GradGuardError", "GradGuardWarning", "NonFiniteGradientError", "warn"]


class GradGuardError(RuntimeError):
    """Base class of every error raised by lightning_gradguard on purpose.

    Example::

        >>> issubclass(NonFiniteGradientError, GradGuardError)
        True
    """


class NonFiniteGradientError(GradGuardError):
    """Raised when gradients are non-finite and the policy says to stop the run.

    The message carries the step, the layers with non-finite gradients and the origin.

    Args:
        message: the human-readable message.
        event: the event that caused the error, if any.

    Example::

        >>> err = NonFiniteGradientError("step 3: NaN in 'fc'")
        >>> str(err), err.event is None
        ("step 3: NaN in 'fc'", True)
    """

    def __init__(self, message: str, event: GradEvent | None = None) -> None:
        super().__init__(message)
        self.event = event


class GradGuardWarning(UserWarning):
    """The warning category of every alarm the guard emits.

    Example: turn alarms into errors in a test suite, or silence them::

        >>> import warnings
        >>> warnings.filterwarnings("ignore", category=GradGuardWarning)
        >>> warnings.resetwarnings()
    """


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # lightning_gradguard/
# The frameworks between the user's code and the guard's hooks: a warning raised in a Lightning hook
# names the user's ``trainer.fit(...)`` line, not Lightning's loop.
_FRAMEWORKS = ("pytorch_lightning", "lightning", "lightning_fabric", "torch", "transformers", "accelerate")


def warn(message: str, category: type[Warning] = GradGuardWarning) -> None:
    """``warnings.warn`` located at the user's line: the first caller outside this package and the
    frameworks that call it (Lightning, Fabric, torch): the line of a plain loop that called
    :meth:`GuardCore.step <lightning_gradguard.GuardCore.step>`, or the ``trainer.fit(...)`` line under a
    Trainer, never a line of lightning_gradguard however deep the call that warns."""
    skip = [_PACKAGE]
    for name in _FRAMEWORKS:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            skip.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    prefixes = tuple(skip)
    frame = sys._getframe(0)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(prefixes):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
