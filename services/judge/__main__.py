"""`python -m services.judge` serves; `python -m services.judge repository` writes its Triton
model repository and exits. Settings: services/judge/settings.py; the lifecycle of both:
services/common/model_service.py."""

import sys

from services.judge.server import JudgeService

sys.exit(JudgeService.main())
