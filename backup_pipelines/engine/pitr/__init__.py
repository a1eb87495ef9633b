"""Point-in-time recovery (PostgreSQL 12+), built on base backups (``engine.backup.base``) and
the WAL archive (``engine.wal``).

- ``window``: what can be recovered (the recovery window, the moment asked for, the base backup
  that recovers to it).
- ``recover``: ``pitr_restore``: a base backup into a NEW data directory, recovery settings,
  optionally start it and wait until it is promoted.
- ``server_config``: the captured configuration files written into the restored data directory,
  with every path, socket and port of the original cluster rewritten.
- ``server``: the restored server (binaries, port, state, log, why it stopped, stopping it).
- ``health``: the WAL archive's health (sensor, check, ``wal-status``).
- ``retention``: base backups by the calendar policy, WAL before the oldest kept one.

The PITR drill lives with the other drills, in ``engine.drills.pitr``.
"""
