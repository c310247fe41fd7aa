"""Alerts: documents for LOW_CONFIDENCE and FAILED items and FAILED executions, the
subscriptions that want them, the channels that carry them and the dispatcher that drains
the store's outbox.

Modules: `documents` (the alert JSON and its human-readable title and body),
`subscriptions` (a subscription URL and its options), `channels` (the Channel contract and
its factory), `webhook` and `file` (two channels), `planner` (which alerts a result raises,
for which subscription) and `dispatcher` (delivery with retries, leases, digests and rate
limits).
"""
