"""`python -m services.reference` serves; `python -m services.reference repository` writes its
Triton model repository and exits. Settings: services/reference/settings.py; the lifecycle of both:
services/common/model_service.py."""

import sys

from services.reference.server import ReferenceService

sys.exit(ReferenceService.main())
