"""`python -m services.reward` serves; `python -m services.reward repository` writes its
Triton model repository and exits. Settings: services/reward/settings.py; the lifecycle of both:
services/common/model_service.py."""

import sys

from services.reward.server import RewardService

sys.exit(RewardService.main())
