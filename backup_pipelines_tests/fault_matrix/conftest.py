"""Fixtures of the fault matrix (see support.py)."""

from backup_pipelines_tests.fault_matrix.support import cli

__all__ = ["cli"]
