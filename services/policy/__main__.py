"""`python -m services.policy` serves; `python -m services.policy repository` writes its
Triton model repository and exits. Settings: services/policy/settings.py; the lifecycle of both:
services/common/model_service.py."""

import sys

from services.policy.server import PolicyService

sys.exit(PolicyService.main())
