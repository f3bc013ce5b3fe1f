"""``python -m lightning_gradguard report LOGDIR``: the same as the ``gradguard`` console script."""

from lightning_gradguard.cli import main

raise SystemExit(main())
