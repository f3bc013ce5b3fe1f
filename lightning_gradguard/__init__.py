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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from lightning_gradguard.core.checkpoints import Checkpoints
    from lightning_gradguard.core.component import GuardComponent, Setup, StepContext
    from lightning_gradguard.core.recovery import Rollback
    from lightning_gradguard.core.replicas import Replicas
    from lightning_gradguard.core.snapshot import RestoreError
    from lightning_gradguard.core.timesteps import track_timesteps
    from lightning_gradguard.dump import load_dump
    from lightning_gradguard.errors import GradGuardError, NonFiniteGradientError
    from lightning_gradguard.events import GradEvent
    from lightning_gradguard.integrations.lightning import GradGuard
    from lightning_gradguard.integrations.transformers import GradGuardCallback
    from lightning_gradguard.notify import WandbAlert, WebhookAlert

__version__ = "0.3.0"

__all__ = [
    "AGC",
    "AutoClip",
    "Checkpoints",
    "ClipContext",
    "ClipOutcome",
    "Clipper",
    "GradEvent",
    "GradGuard",
    "GradGuardCallback",
    "GradGuardError",
    "GradGuardWarning",
    "GuardComponent",
    "GuardCore",
    "LayerNormClip",
    "NonFiniteGradientError",
    "NormClip",
    "Replicas",
    "RestoreError",
    "Rollback",
    "Setup",
    "StepContext",
    "StepReport",
    "ValueClip",
    "WandbAlert",
    "WebhookAlert",
    "ZClip",
    "__version__",
    "load_dump",
    "track_timesteps",
]


# Where each public name lives. Everything loads on first use (PEP 562): `import lightning_gradguard`
# costs nothing, `GuardCore` and the clippers load torch only, `GradGuard` loads Lightning, and
# `gradguard report` (lightning_gradguard.cli) loads neither.
_HOMES = {
    **dict.fromkeys(
        ("AGC", "AutoClip", "ClipContext", "ClipOutcome", "Clipper", "LayerNormClip", "NormClip", "ValueClip", "ZClip"),
        "lightning_gradguard.clip",
    ),
    "GuardCore": "lightning_gradguard.core",
    "StepReport": "lightning_gradguard.core",
    "Rollback": "lightning_gradguard.core.recovery",
    "Replicas": "lightning_gradguard.core.replicas",
    "RestoreError": "lightning_gradguard.core.snapshot",
    "GradGuardWarning": "lightning_gradguard.core.alerts",
    "Checkpoints": "lightning_gradguard.core.checkpoints",
    "GuardComponent": "lightning_gradguard.core.component",
    "Setup": "lightning_gradguard.core.component",
    "StepContext": "lightning_gradguard.core.component",
    "track_timesteps": "lightning_gradguard.core.timesteps",
    "load_dump": "lightning_gradguard.dump",
    "GradGuardError": "lightning_gradguard.errors",
    "NonFiniteGradientError": "lightning_gradguard.errors",
    "GradEvent": "lightning_gradguard.events",
    "GradGuard": "lightning_gradguard.integrations.lightning",
    "GradGuardCallback": "lightning_gradguard.integrations.transformers",
    "WandbAlert": "lightning_gradguard.notify",
    "WebhookAlert": "lightning_gradguard.notify",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # found once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
