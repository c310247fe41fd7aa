"""Executions, the Map fan-out and the local executor that runs them."""

from .execution import ExecutionRunner
from .lifecycle import cancel_execution, final_status
from .pipeline import Pipeline
from .recording import ResultSink

__all__ = ["ExecutionRunner", "Pipeline", "ResultSink", "cancel_execution", "final_status"]
