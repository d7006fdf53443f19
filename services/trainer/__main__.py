"""`python -m services.trainer` runs the trainer (see services/trainer/server.py; settings from RLHF_* variables)."""

import sys

from services.common.entry import run


def _serve() -> None:
    from services.trainer.server import main

    main()


sys.exit(run("trainer", _serve))
