"""``python -m p2pcloudd``: the daemon (see :mod:`p2pcloudd.service` and docs/daemon.md)."""

import sys

from p2pcloudd.service import main

if __name__ == "__main__":
    sys.exit(main())
