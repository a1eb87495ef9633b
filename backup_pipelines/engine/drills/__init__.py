"""Drills: regular proof that backups restore, without touching the target's database.

- ``logical``: the restore drill (newest backup into a scratch database, row counts, amcheck,
  measured RTO) and the restore test of ``backup --test``.
- ``fresh_server``: the throwaway cluster (initdb) of the fresh-server restore drill, and the
  choice between a fresh-server and a same-server drill.
- ``amcheck``: ``bt_index_check`` on every btree index of a restored database.
- ``pitr``: the point-in-time recovery drill (restore to a fresh moment on a scratch port).
"""
