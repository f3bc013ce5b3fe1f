"""Alerts that reach a person: :class:`~.webhook.WebhookAlert` (Slack, Mattermost, Discord, your
own endpoint) and :class:`~.wandb.WandbAlert` (``wandb.alert``). Each is a *notifier*: an object
with ``on_alert(event, message, run)`` and ``close(timeout)`` that the guard's alert router calls
with the rate-limited alarms, on rank zero. Write your own the same way."""

from lightning_gradguard.notify.wandb import WandbAlert
from lightning_gradguard.notify.webhook import WebhookAlert

__all__ = ["WandbAlert", "WebhookAlert"]
