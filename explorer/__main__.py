"""Entry point of ``token-explorer`` and ``python -m explorer``.

With a subcommand (``run``, ``methods``, ``plugins``, ...) it runs headless; otherwise it opens
the window, with an optional image path (``token-explorer photo.jpg``).
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from explorer.cli.main import COMMANDS

    if argv and (argv[0] in COMMANDS or argv[0] in ("-h", "--help")):
        from explorer.cli.main import main as cli_main

        return cli_main(argv)
    from explorer.qt.app import main as gui_main

    return gui_main(argv)


if __name__ == "__main__":
    sys.exit(main())
