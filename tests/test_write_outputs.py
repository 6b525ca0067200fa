"""write_rows_csv writes csv.DictWriter's bytes, by its fast path (rows of one layout) and its fallback."""

from __future__ import annotations

import csv
import gc
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from jaxserve.experiment import _collection_paused, write_rows_csv

CELLS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.booleans(), st.none(),
    st.text(alphabet=st.sampled_from('ab ,"\r\n:é'), max_size=6),
)  # fmt: skip


def dict_writer_bytes(path, rows) -> bytes:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["request_id"])
        writer.writeheader()
        writer.writerows(rows)
    return path.read_bytes()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from("abcde"), min_size=1, max_size=5, unique=True), st.data())
def test_rows_of_one_layout_are_written_as_dict_writer_writes_them(fields, data):
    rows = [{f: data.draw(CELLS) for f in fields} for _ in range(data.draw(st.integers(0, 6)))]
    if rows and data.draw(st.booleans()):  # the same keys in another order: still by the first row's order
        rows[-1] = dict(reversed(list(rows[-1].items())))
    with tempfile.TemporaryDirectory() as d:
        write_rows_csv(str(Path(d) / "fast.csv"), rows)
        assert (Path(d) / "fast.csv").read_bytes() == dict_writer_bytes(Path(d) / "slow.csv", rows)


def test_rows_of_other_layouts_go_through_dict_writer(tmp_path):
    rows = [{"a": 1, "b": 2.5}, {"a": 3}]  # a missing key: an empty cell
    write_rows_csv(str(tmp_path / "fast.csv"), rows)
    assert (tmp_path / "fast.csv").read_bytes() == dict_writer_bytes(tmp_path / "slow.csv", rows) == b"a,b\r\n1,2.5\r\n3,\r\n"
    with pytest.raises(ValueError, match="not in fieldnames"):
        write_rows_csv(str(tmp_path / "bad.csv"), [{"a": 1, "b": 2}, {"a": 1, "b": 2, "c": 3}])


@pytest.mark.parametrize("enabled", [True, False])
def test_collection_is_paused_inside_and_restored_after(enabled):
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        with _collection_paused():
            assert not gc.isenabled()
        assert gc.isenabled() is enabled
        with pytest.raises(RuntimeError), _collection_paused():
            raise RuntimeError("a failed write")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
