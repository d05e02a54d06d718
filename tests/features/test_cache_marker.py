"""The feature cache folder carries the `cache` marker when mmca makes it, never a user's folder."""

from mmca.features.cache import dataset_dir
from mmca.folders import MARKER, kind_of


def test_a_new_cache_folder_is_marked(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    entry = dataset_dir(tmp_path / "new-cache", data)
    assert entry.parent == (tmp_path / "new-cache").resolve()
    assert kind_of(tmp_path / "new-cache") == "cache"


def test_a_users_folder_used_as_cache_is_not_marked(tmp_path):
    data, mine = tmp_path / "data", tmp_path / "mine"
    data.mkdir()
    mine.mkdir()
    (mine / "thesis.txt").write_text("thesis\n")
    dataset_dir(mine, data)
    assert not (mine / MARKER).exists() and kind_of(mine) is None
