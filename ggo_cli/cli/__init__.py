"""The ``ggo-cli`` command line: commands, shared options, what it shows, ``info`` and ``demo``."""
