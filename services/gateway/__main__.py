"""`python -m services.gateway` runs the gateway (see services/gateway/app.py; settings from RLHF_* variables)."""

import sys

from services.common.entry import run


def _serve() -> None:
    from services.gateway.app import main

    main()


sys.exit(run("gateway", _serve))
