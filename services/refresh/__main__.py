"""`python -m services.refresh` runs the refresh (see services/refresh/worker.py; settings from RLHF_* variables)."""

import sys

from services.common.entry import run


def _serve() -> None:
    from services.refresh.worker import main

    main()


sys.exit(run("refresh", _serve))
