"""``python -m backup_pipelines.cli``: how the async WAL worker is started (same interpreter)."""

import sys

from backup_pipelines.cli import main

sys.exit(main())
