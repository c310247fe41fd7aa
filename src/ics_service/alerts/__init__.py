"""Alerts: documents, outbox, dispatcher and channels."""
