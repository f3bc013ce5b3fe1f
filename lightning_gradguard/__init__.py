"""lightning_gradguard: keep gradients honest.

One callback measures every optimizer step (the gradient norm of each layer), detects non-finite
gradients and names the layer they came from, clips before the optimizer step, and skips a poisoned
step on every rank instead of letting NaN into the weights::

    from pytorch_lightning import Trainer
    from lightning_gradguard import GradGuard, NormClip

    trainer = Trainer(callbacks=[GradGuard(clip=NormClip(max_norm=1.0))])

The framework-free core (:class:`GuardCore`, in :mod:`lightning_gradguard.core`, which imports
torch only) does the same in a plain PyTorch loop. ``import lightning_gradguard`` loads no
Lightning: ``GradGuard`` (:mod:`lightning_gradguard.integrations.lightning`) loads it when first used.
"""

from typing import TYPE_CHECKING, Any

from lightning_gradguard.clip import (
    AGC,
    AutoClip,
    ClipContext,
    ClipOutcome,
    Clipper,
    LayerNormClip,
    NormClip,
    ValueClip,
    ZClip,
)
from lightning_gradguard.core import GuardCore, StepReport
from lightning_gradguard.core.alerts import GradGuardWarning
from lightning_gradguard.core.timesteps import track_timesteps
from lightning_gradguard.dump import load_dump
from lightning_gradguard.errors import GradGuardError, NonFiniteGradientError
from lightning_gradguard.events import GradEvent
from lightning_gradguard.notify import WandbAlert, WebhookAlert

if TYPE_CHECKING:
    from lightning_gradguard.integrations.lightning import GradGuard

__version__ = "0.2.0"

__all__ = [
    "AGC",
    "AutoClip",
    "ClipContext",
    "ClipOutcome",
    "Clipper",
    "GradEvent",
    "GradGuard",
    "GradGuardError",
    "GradGuardWarning",
    "GuardCore",
    "LayerNormClip",
    "NonFiniteGradientError",
    "NormClip",
    "StepReport",
    "ValueClip",
    "WandbAlert",
    "WebhookAlert",
    "ZClip",
    "__version__",
    "load_dump",
    "track_timesteps",
]


def __getattr__(name: str) -> Any:
    # The Lightning adapter loads Lightning (about 2 s): only when it is asked for, so that a
    # plain-PyTorch or Fabric user of GuardCore and the clippers never pays for it.
    if name == "GradGuard":
        from lightning_gradguard.integrations.lightning import GradGuard

        return GradGuard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
