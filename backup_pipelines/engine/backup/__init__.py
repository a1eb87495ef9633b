"""Taking backups.

- ``logical``: the logical backup of one database (pg_dump -> compress -> encrypt -> hash ->
  file, in one streaming pass): ``run_backup``.
- ``pg_dump``: talking to pg_dump and the source: the dump's snapshot, pg_dump's arguments,
  what its failures mean, and ``count(*)`` in the snapshot where the stream cannot count.
- ``globals``: the server's globals (``pg_dumpall --globals-only``) and the database's own
  owner, privileges and settings, stored with every logical backup; reading them back.
- ``directory``: the directory format (``pg_dump -Fd -j N``): its folder streamed as one tar
  artifact with row counts from the data files, and read back (verify, restore).
- ``counting``: exact per-table row counts read from the dump stream in that same pass (plain
  COPY blocks, custom-format data blocks), so the source is scanned once.
- ``base``: physical base backups for point-in-time recovery (pg_basebackup), and listing them.
- ``server_config``: the server's configuration files kept outside its data directory
  (Debian's /etc/postgresql/...), captured into the base backup's tar and listed in ``.meta``.
- ``base_reader``: reading a base backup back (extract with its checksum, pg_verifybackup).
- ``files``: what both write with: the target's folder and lock, the hashing sink, undoing a
  failed backup.
"""
