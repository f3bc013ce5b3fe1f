"""What the Trainer does not hand its callbacks, taken from the model's own forward pass.

A ``TrainerCallback`` sees no batch and no loss: ``training_step`` runs between ``on_step_begin`` and
``on_pre_optimizer_step`` with nothing in between for callbacks. The guard needs three things from
each micro-batch, and :class:`ForwardTap` takes them with two hooks on the model (training mode only,
so evaluation passes are not seen), each keeping a *reference*, never a copy:

* before the forward pass, the RNG state and the model's attributes (``begin`` is called: the
  guard's ``begin_step``), and the inputs, so that a fault can be replayed on the step's last
  micro-batch and dumped with it;
* after it, the model's own loss (``output.loss``, what the Trainer's default ``compute_loss``
  returns), whose finiteness names a NaN loss as the origin and feeds the loss's spike statistic.

A Trainer whose ``compute_loss`` is its own (the model returns no ``loss``) still has its gradients
guarded; the loss is just not observed, and a replay says that it failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

__all__ = ["ForwardTap", "loss_of"]


def loss_of(output: Any) -> Tensor | None:
    """The loss a Hugging Face model returned (``output.loss`` or ``output["loss"]``), or None.

    Example::

        >>> import torch
        >>> loss_of({"loss": torch.tensor(1.0)}).item(), loss_of(torch.ones(2))
        (1.0, None)
    """
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    return loss if isinstance(loss, Tensor) else None


class ForwardTap:
    """Hooks on ``model`` that keep each training micro-batch's inputs and observe its loss.

    Args:
        model: the model the Trainer trains (unwrapped: DDP's and FSDP's wrappers call it).
        begin: called before each training forward pass (the guard's ``begin_step``).
        observe_loss: called with the loss the model returned, when it returned one.
    """

    def __init__(self, model: nn.Module, begin: Callable[[], None], observe_loss: Callable[[Tensor], None]) -> None:
        self.model = model
        self.inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None  # the last micro-batch's
        self.saw_loss = False
        self._begin, self._observe = begin, observe_loss
        self._replaying = False
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after),
        ]

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training and not self._replaying:
            self.inputs = (args, kwargs)
            self._begin()

    def _after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not module.training or self._replaying:
            return
        loss = loss_of(output)
        if loss is not None:
            self.saw_loss = True
            self._observe(loss)

    def batch(self) -> Any:
        """The last training micro-batch's inputs, as the model was called with them (for a dump)."""
        if self.inputs is None:
            return None
        args, kwargs = self.inputs
        return {**kwargs, **({"args": args} if args else {})}

    def closure(self) -> Callable[[], Any] | None:
        """The model's forward pass again on the last micro-batch, returning its output (its ``loss``
        is the replay's), with these hooks silent; None before any training forward pass."""
        if self.inputs is None:
            return None
        args, kwargs = self.inputs

        def replay() -> Any:
            self._replaying = True
            try:
                return self.model(*args, **kwargs)
            finally:
                self._replaying = False

        return replay

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.inputs = None
