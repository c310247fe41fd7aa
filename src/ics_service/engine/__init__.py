"""Executions, the Map fan-out and the executors that run them."""

from .execution import ExecutionRunner, ResultSink, final_status
from .pipeline import Pipeline

__all__ = ["ExecutionRunner", "Pipeline", "ResultSink", "final_status"]
