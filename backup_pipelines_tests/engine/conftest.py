"""Fixtures shared by the engine tests."""

from backup_pipelines_tests.gpg_support import gpg_keys, gpg_tmp  # noqa: F401
