"""Restores (job ``restore_database``) and restore drills (``<target>/restore_drill``)."""
