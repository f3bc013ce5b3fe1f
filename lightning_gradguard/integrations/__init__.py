"""Adapters from training frameworks to the framework-free core: :mod:`.lightning` (the
``GradGuard`` callback). Plain PyTorch and Fabric loops use :class:`~lightning_gradguard.GuardCore`."""
