"""The ``wsi-fl`` command (console entry point ``wsi_fl.cli:main``): one module per subcommand.

Importing this package imports only the standard library (``main`` builds the
parser from stdlib-only config modules), so ``--help`` stays instant.
"""

from wsi_fl.cli.main import main

__all__ = ["main"]
