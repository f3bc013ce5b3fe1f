"""The Lightning adapter: :class:`GradGuard` (:mod:`.callback`), a :class:`~lightning_gradguard.GuardCore`
that is also a Lightning ``Callback`` and translates each Trainer hook into one core call.

Beside it, each piece of Lightning-specific glue in a module of its own:

* :mod:`.trainer` the Trainer's facts the guard needs, read once at setup: the strategy (refused,
  sharded), the logging cadence, the run's name, how a host object is gathered from every rank, the
  module's ``on_gradguard_rollback`` hook and the ``WandbLogger``'s alerts;
* :mod:`.replay` replaying a step under the Trainer: the closure (``training_step`` again, ``self.log``
  silenced), the run's precision, where a replay cannot work, and the DDP communication hook that
  keeps each rank's own gradient fault.
"""

from lightning_gradguard.integrations.lightning.callback import GradGuard

__all__ = ["GradGuard"]
