"""`python -m services.reward` serves; `python -m services.reward repository` writes its Triton model
repository and exits (settings: services/reward/settings.py)."""

import sys

from services.common.entry import run


def _serve() -> None:
    from services.reward.server import main

    main()


def _repository() -> int:
    from services.reward.repository import main

    return main()


sys.exit(run("reward", _serve, {"repository": _repository}))
