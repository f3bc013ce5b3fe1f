"""The library's one exception family.

Every error the guard raises on purpose is a :class:`GradGuardError`, so a training script can catch
the whole family with one ``except``. :class:`NonFiniteGradientError` carries the
:class:`~lightning_gradguard.events.GradEvent` that caused it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_gradguard.events import GradEvent

__all__ = ["GradGuardError", "NonFiniteGradientError"]


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
