"""Helpers of the Dagster layer that are not Dagster definitions themselves.

``backup_pipelines/defs/`` holds only modules that ``dg.load_from_defs_folder`` loads as
definitions (each has one ``@dg.definitions`` function); what several of them share lives here:
asset and check names (``names``), the targets file as the definitions see it (``project``),
run tags, kinds and owners (``tags``), schedules built from cadences (``cadences``), results of
assets and checks (``results``), PITR helpers (``pitr``), what the instance knows about each
target (``status``), the run coordinator that tags Launchpad runs (``run_coordinator``)
and the per-database partitions of server targets (``partitions``).
Nothing here imports ``backup_pipelines.defs``.
"""
