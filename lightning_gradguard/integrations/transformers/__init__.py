"""The Hugging Face Trainer adapter: :class:`GradGuardCallback` (:mod:`.callback`), a
:class:`~lightning_gradguard.GuardCore` that is also a ``transformers.TrainerCallback`` and translates
each Trainer event into one core call. Needs the ``[transformers]`` extra.

Beside it, each piece of Trainer-specific glue in a module of its own:

* :mod:`.trainer` the Trainer's facts, read once at ``on_train_begin``: its callback handler, DeepSpeed
  refused, ``max_grad_norm`` warned about, the logging cadence, the batch positions of a step, the
  cross-rank sum, the model's rollback hook, the state of a resumed run;
* :mod:`.inputs` what the Trainer does not hand a callback, taken from the model's forward pass: each
  micro-batch's inputs (replay, dumps) and its loss;
* :mod:`.skip` the real skip: the decision read every step, and the LR scheduler held back on a
  skipped step (accelerate's skipped-step signal);
* :mod:`.reporting` the Trainer's TensorBoard directory, its other reporters, W&B alerts.
"""

from lightning_gradguard.integrations.transformers.callback import GradGuardCallback

__all__ = ["GradGuardCallback"]
