"""The tool's own version, recorded in every backup's metadata."""

from importlib.metadata import PackageNotFoundError, version

try:
    TOOL_VERSION = version("backup_pipelines")
except PackageNotFoundError:  # running from a source tree that is not installed
    TOOL_VERSION = "0.0.0+source"
