"""The backup engine: plain Python, no Dagster. The CLI and the Dagster layer both call it."""
