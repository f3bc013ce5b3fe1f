"""Adapters from training frameworks to the framework-free core: :mod:`.lightning` (the
``GradGuard`` callback) and :mod:`.transformers` (``GradGuardCallback``, for Hugging Face's Trainer:
the ``[transformers]`` extra). Plain PyTorch and Fabric loops use :class:`~lightning_gradguard.GuardCore`."""
