"""The versioned-folder store every writer of versions uses: 8-digit names (older 6-digit ones
still read), atomic commit, the CURRENT marker, pruning that spares the protected folder and a
temp folder newer than the newest version."""

from __future__ import annotations

import hashlib
import json

from services.common.versions import MARKER, VersionedFolders, manifest


def _write(store: VersionedFolders, number: int, text: str = "x"):
    tmp = store.begin(number)
    (tmp / "model.safetensors").write_text(text)
    return store.commit(tmp, number)


def test_names_numbers_and_the_folders_in_order(tmp_path):
    store = VersionedFolders(tmp_path, "v")
    assert store.name(2) == "v00000002" and store.path(12) == tmp_path / "v00000012"
    (tmp_path / "v000007").mkdir()  # a refresh version from before the store (6 digits)
    (tmp_path / "vendor").mkdir()  # not a version
    (tmp_path / "step-00000003").mkdir()  # another store's prefix
    _write(store, 12)
    assert [(n, p.name) for n, p in store.folders()] == [(7, "v000007"), (12, "v00000012")]
    assert store.number(tmp_path / "v12x") is None
    assert VersionedFolders(tmp_path, "step-").folders() == [(3, tmp_path / "step-00000003")]


def test_commit_replaces_a_folder_of_the_same_number_and_leaves_no_temp(tmp_path):
    store = VersionedFolders(tmp_path)
    _write(store, 4, "first")
    final = _write(store, 4, "rerun")
    assert (final / "model.safetensors").read_text() == "rerun"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v00000004"]
    assert manifest(final) == {"model.safetensors": hashlib.sha256(b"rerun").hexdigest()}


def test_the_marker_is_replaced_whole(tmp_path):
    store = VersionedFolders(tmp_path)
    assert store.read_marker() is None
    store.write_marker({"weights_version": 3, "files": ["v00000003/model.safetensors"]})
    store.write_marker({"weights_version": 4, "files": ["v00000004/model.safetensors"]})
    assert json.loads((tmp_path / MARKER).read_text())["weights_version"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER]  # no temp file left


def test_prune_keeps_the_newest_and_the_protected_and_a_newer_temp(tmp_path):
    store = VersionedFolders(tmp_path)
    for number in (1, 2, 3, 4, 5):
        _write(store, number)
    store.begin(2)  # a crash's leftover, older than the newest: removed
    store.begin(9)  # being written now: kept
    store.prune(keep=2, protect=[store.path(1)])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tmp-v00000009",
        "v00000001",
        "v00000004",
        "v00000005",
    ]
