"""Schema migrations in drizzle-kit's layout, and rolling the last N of them back safely.

drizzle-kit writes ``<folder>/NNNN_<tag>.sql`` plus ``<folder>/meta/_journal.json`` (entries with
``idx``, ``tag``, ``when``, ``breakpoints``); statements inside a file are separated by
``--> statement-breakpoint``. drizzle-orm's migrator records each applied file as one row of
``drizzle.__drizzle_migrations (id SERIAL PRIMARY KEY, hash text NOT NULL, created_at bigint)``:
``hash`` is the SHA-256 (hex) of the file's text, ``created_at`` the journal entry's ``when``.
It treats every journal entry whose ``when`` is newer than the newest ``created_at`` as pending
and applies all of them in one transaction.

Drizzle has no down migrations. Our convention: ``NNNN_<tag>.down.sql`` beside
``NNNN_<tag>.sql``, split on the same breakpoint marker, undoing exactly that migration (schema
and data), and safe inside a transaction (no ``CREATE INDEX CONCURRENTLY``, no ``COMMIT``).

A rollback: plan (refuse before touching anything if the plan is unsafe), confirm, take a
safety backup through the normal backup engine, then run the down migrations newest first and
delete their rows, all in one transaction, and verify the table ends where it should.

Modules: ``journal`` (the folder and the tracking table), ``plan`` (planning a rollback),
``rollback`` (running it), ``errors``.
"""
