"""`python -m services.policy` serves; `python -m services.policy repository` writes its Triton model
repository and exits (settings: services/policy/settings.py)."""

import sys

from services.common.entry import run


def _serve() -> None:
    from services.policy.server import main

    main()


def _repository() -> int:
    from services.policy.repository import main

    return main()


sys.exit(run("policy", _serve, {"repository": _repository}))
