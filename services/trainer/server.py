"""The trainer service: consumes `rlhf.rollouts.v1`, runs RL updates, checkpoints, and pushes each
new weights version to every policy replica. Start it with

    RLHF_TRAINER_MODEL_DIR=/models/policy RLHF_TRAINER_POLICY_ADDRESSES=127.0.0.1:50051 \
    RLHF_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python -m services.trainer

(several ranks: `torchrun --nproc-per-node N -m services.trainer`). SIGTERM or SIGINT
finishes the current update and exits; `kill -9` is safe too: the next start resumes from the
last checkpoint without losing or re-using a rollout. The loop itself is in loop.py.
"""

from __future__ import annotations

import logging
import signal

from services.common.logging import configure_logging
from services.common.metrics import serve_metrics
from services.trainer import distributed
from services.trainer.loop import TrainerService
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


def main() -> None:
    configure_logging("trainer")
    settings = TrainerSettings()
    service = TrainerService(settings)

    def on_signal(signum, _frame):
        log.info("stopping after the current update", extra={"fields": {"signal": signum}})
        service.stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if settings.metrics_port and service.rank.is_leader:
        serve_metrics(service.metrics.registry, settings.metrics_port)
    try:
        service.run()
    finally:
        service.close()
        distributed.shutdown()
    log.info(
        "trainer stopped",
        extra={"fields": {"step": service.step, "weights_version": service.version}},
    )
