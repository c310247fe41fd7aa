"""The outside contract's result record, as DESIGN.md names its fields (the CLI's results
files and the HTTP API answer the same record)."""

RESULT_FIELDS = frozenset(
    {
        "execution_id",
        "item_id",
        "uri",
        "status",
        "label",
        "label_index",
        "confidence",
        "top_k",
        "threshold",
        "model",
        "error",
        "image",
        "attempts",
        "started_at",
        "finished_at",
        "timings_ms",
    }
)
