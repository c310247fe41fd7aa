"""Alerts: documents for LOW_CONFIDENCE and FAILED items and FAILED executions, the
channels that carry them to the subscriptions that want them, and the dispatcher that
drains the store's outbox.

Modules: `documents` (the alert JSON and its human-readable title and body), `channels`
(the Channel contract and its factory), `webhook` and `file` (two channels), `planner`
(which alerts a result raises, for which subscription) and `dispatcher` (delivery with
retries, leases, digests and rate limits). A subscription (a URL and its options) is
parsed by `ics_service.subscriptions`, below the settings that hold it.
"""
