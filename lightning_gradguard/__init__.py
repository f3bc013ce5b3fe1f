"""lightning_gradguard: keep gradients honest.

One callback measures every optimizer step (the gradient norm of each layer), detects non-finite
gradients and names the layer they came from, clips before the optimizer step, and skips a poisoned
step on every rank instead of letting NaN into the weights::

    from pytorch_lightning import Trainer
    from lightning_gradguard import GradGuard, NormClip

    trainer = Trainer(callbacks=[GradGuard(clip=NormClip(max_norm=1.0))])

The framework-free core (:class:`GuardCore`, in :mod:`lightning_gradguard.core`, which imports
torch only) does the same in a plain PyTorch loop.
"""

from lightning_gradguard.adaptive import AutoClip, ZClip
from lightning_gradguard.alerts import GradGuardWarning
from lightning_gradguard.callback import GradGuard
from lightning_gradguard.clip import AGC, ClipContext, ClipOutcome, Clipper, LayerNormClip, NormClip, ValueClip
from lightning_gradguard.core import GuardCore, StepReport
from lightning_gradguard.dump import load_dump
from lightning_gradguard.errors import GradGuardError, NonFiniteGradientError
from lightning_gradguard.events import GradEvent
from lightning_gradguard.timesteps import track_timesteps

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
    "ZClip",
    "__version__",
    "load_dump",
    "track_timesteps",
]

