"""``python -m lyra_pipeline`` and the ``lyra`` console script: the CLI, with a Ctrl-C that arrives while its
modules are still importing answered by one line instead of a traceback."""

from __future__ import annotations

import sys

INTERRUPTED_EARLY = "\ninterrupted: before any work started; nothing was written\n"


def main() -> None:
    try:
        from lyra_pipeline.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write(INTERRUPTED_EARLY)
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()
