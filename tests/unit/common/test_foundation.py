"""Unit tests of the foundation's pure pieces: settings from the environment, topic specs,
generated Triton model configs, and the daemon lifecycle (nothing left behind)."""

from __future__ import annotations

import sys
from pathlib import Path

from deploy.local.process import Daemon, _group_alive
from services.common import topics
from services.common.settings import KafkaSettings, TritonSettings
from services.common.triton_repo import PythonModelSpec, TensorIO, config_pbtxt, write_model


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RLHF_KAFKA_BOOTSTRAP_SERVERS", "a:1, b:2")
    monkeypatch.setenv("RLHF_TRITON_URL", "triton:8001")
    assert KafkaSettings().servers == ["a:1", "b:2"]
    assert TritonSettings().url == "triton:8001"


def test_join_topics_are_co_partitioned_and_names_versioned():
    by_name = {t.name: t for t in topics.TOPICS}
    assert by_name[topics.GENERATIONS].partitions == by_name[topics.FEEDBACK].partitions
    data = [n for n in by_name if not n.endswith(topics.DLQ_SUFFIX)]
    assert all(name.startswith("rlhf.") and name.endswith(".v1") for name in data)
    assert by_name[topics.WEIGHTS].configs["cleanup.policy"] == "compact"
    # Every data topic has its dead-letter topic, and nothing else is in the table.
    assert sorted(by_name) == sorted([*data, *(topics.dlq_topic(n) for n in data)])
    assert all(by_name[topics.dlq_topic(n)].partitions == 1 for n in data)


def test_model_config_has_batching_decoupling_and_parameters(tmp_path: Path):
    spec = PythonModelSpec(
        name="m",
        python_class="pkg.mod:Cls",
        inputs=(TensorIO("IDS", "TYPE_INT64", (-1,), ragged=True),),
        outputs=(TensorIO("OUT", "TYPE_FP32", (-1,)),),
        max_batch_size=8,
        max_queue_delay_us=500,
        decoupled=True,
        device="cpu",
        parameters={"model_dir": "/models/x"},
    )
    text = config_pbtxt(spec)
    assert 'backend: "python"' in text and "max_batch_size: 8" in text
    assert "dynamic_batching { max_queue_delay_microseconds: 500 }" in text
    assert "decoupled: True" in text and "KIND_CPU" in text
    assert 'key: "model_dir" value: { string_value: "/models/x" }' in text
    assert (
        'name: "IDS"\n    data_type: TYPE_INT64\n    dims: [ -1 ]\n    allow_ragged_batch: true'
        in text
    )
    folder = write_model(tmp_path, spec, python_path=["/opt/app"])
    model_py = (folder / "1" / "model.py").read_text()
    assert "from pkg.mod import Cls as TritonPythonModel" in model_py and "/opt/app" in model_py


def test_daemon_stop_leaves_no_process(tmp_path: Path):
    daemon = Daemon("sleeper", tmp_path)
    # A parent with a child in the same session: stopping must take both.
    pid = daemon.start(
        [
            sys.executable,
            "-c",
            "import subprocess,time; subprocess.Popen(['sleep','60']); time.sleep(60)",
        ]
    )
    assert daemon.pid == pid and (tmp_path / "sleeper.pid").exists()
    assert daemon.stop(timeout_s=10)
    assert not _group_alive(pid) and daemon.pid is None and not (tmp_path / "sleeper.pid").exists()
