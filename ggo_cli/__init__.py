"""ggo-cli: ground-glass opacity segmentation and volumetry for chest CT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ggo-cli")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
