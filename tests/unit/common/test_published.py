"""versions_root/CURRENT: written atomically, read back as written; a folder inside the root is
named relative to it (readers may mount the volume elsewhere), one outside by its full path."""

from __future__ import annotations

from services.common.versions import MARKER as PUBLISHED_MARKER
from services.common.versions import read_published, write_published


def test_round_trip_relative_inside_the_root(tmp_path):
    root = tmp_path / "versions"
    (root / "v00000007").mkdir(parents=True)
    assert read_published(root) is None
    write_published(root, 7, root / "v00000007", {"model.safetensors": "ab" * 32})
    assert '"path": "v00000007"' in (root / PUBLISHED_MARKER).read_text()
    moved = tmp_path / "mounted-elsewhere"
    root.rename(moved)
    published = read_published(moved)
    assert (published.version, published.path, published.file_sha256) == (
        7,
        moved / "v00000007",
        {"model.safetensors": "ab" * 32},
    )
    assert [p.name for p in moved.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_a_folder_outside_the_root_keeps_its_full_path(tmp_path):
    root, other = tmp_path / "versions", tmp_path / "elsewhere" / "v2"
    root.mkdir()
    other.mkdir(parents=True)
    write_published(root, 2, other, {})
    write_published(root, 3, other, {"a": "b"})  # replaced, not appended
    published = read_published(root)
    assert (published.version, published.path, published.file_sha256) == (
        3,
        other.resolve(),
        {"a": "b"},
    )
