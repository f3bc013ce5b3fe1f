"""The metric keys' scheme, below every stage: every key starts with :data:`METRIC_PREFIX`
(``gradguard/``), per-layer norms are ``gradguard/layer/<name>``, per-layer update-to-weight ratios
``gradguard/update_ratio/<name>``. Imports nothing, so that reading
event files (``gradguard report``) needs no torch."""

__all__ = ["LAYER_KEY_PREFIX", "METRIC_PREFIX", "UPDATE_KEY_PREFIX"]

METRIC_PREFIX = "gradguard/"
LAYER_KEY_PREFIX = f"{METRIC_PREFIX}layer/"
UPDATE_KEY_PREFIX = f"{METRIC_PREFIX}update_ratio/"
