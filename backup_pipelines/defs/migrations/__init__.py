"""Schema migration rollback as a Dagster job (``rollback_migrations``)."""
