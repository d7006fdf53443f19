"""`python -m services.reference` serves; `python -m services.reference repository` writes its Triton model
repository and exits (settings: services/reference/settings.py)."""

import sys

from services.common.entry import run


def _serve() -> None:
    from services.reference.server import main

    main()


def _repository() -> int:
    from services.reference.repository import main

    return main()


sys.exit(run("reference", _serve, {"repository": _repository}))
