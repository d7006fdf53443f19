"""`python -m services.rollout` runs the rollout (see services/rollout/worker.py; settings from RLHF_* variables)."""

import sys

from services.common.entry import run


def _serve() -> None:
    from services.rollout.worker import main

    main()


sys.exit(run("rollout", _serve))
