"""`python -m services.curator` runs the curator (see services/curator/server.py; settings from RLHF_* variables)."""

import sys

from services.common.entry import run


def _serve() -> None:
    from services.curator.server import main

    main()


sys.exit(run("curator", _serve))
