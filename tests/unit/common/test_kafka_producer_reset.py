"""The workaround for kafka-python's idempotent producer that never asks for a new producer id
after `reset_producer_id` (services/common/kafka.py); the broker outage it matters in is
tests/integration/test_kafka_producer_outage.py."""

from __future__ import annotations

from kafka.producer.transaction_manager import (
    ProducerIdAndEpoch,
    TransactionManager,
    TransactionState,
)

import services.common.kafka  # installs the workaround


def ready_idempotent() -> TransactionManager:
    manager = TransactionManager()
    manager.init_producer_id()
    assert manager.next_request_handler(False) is not None  # the first InitProducerId
    manager.set_producer_id_and_epoch(ProducerIdAndEpoch(7, 0))
    manager._transition_to(TransactionState.READY)
    assert manager.has_producer_id()
    return manager


def test_a_reset_producer_asks_for_a_new_id_on_the_next_sender_turn():
    manager = ready_idempotent()
    manager.reset_producer_id()  # what the sender does when a sent batch expires
    assert not manager.has_producer_id()
    manager.init_producer_id()  # the sender's next turn
    handler = manager.next_request_handler(False)
    assert handler is not None and type(handler).__name__ == "InitProducerIdHandler"


def test_the_workaround_is_installed_once():
    import importlib

    first = TransactionManager.reset_producer_id
    importlib.reload(services.common.kafka)
    assert TransactionManager.reset_producer_id is first
    assert first.reinitialises
