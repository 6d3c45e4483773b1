"""Orchestration: one compress() over every model and method, compare, the report."""
