"""workload.clients: one stream split among clients by weight."""

from __future__ import annotations

import pytest

from jaxserve.workload import build_requests
from jaxserve.workload.arrivals import ArrivalProcess
from jaxserve.workload.clients import assign_clients, parse_clients
from jaxserve.workload.lengths import Fixed, Pair


def _stream(n=3000):
    return build_requests(arrivals=ArrivalProcess("poisson", 10.0, 1.0), lengths=Pair(Fixed(8), Fixed(4)),
                          num_requests=n, seed=0)  # fmt: skip


def test_parse():
    assert parse_clients("") == ()
    assert parse_clients("A:1, B:2.5") == (("A", 1.0), ("B", 2.5))


@pytest.mark.parametrize("text, message", [
    ("A", "expected 'name:weight,...'"), ("A:x", "weight of client 'A' must be a number, got 'x'"),
    ("A:0", "must be > 0"), ("A:1,A:2", "client 'A' appears twice"), ("a b:1", "expected 'name:weight"),
])  # fmt: skip
def test_parse_errors_name_the_key(text, message):
    with pytest.raises(ValueError, match="workload.clients") as e:
        parse_clients(text)
    assert message in str(e.value)


def test_split_by_weight_keeps_every_request_once_and_is_reproducible():
    stream = _stream()
    out = assign_clients(stream, parse_clients("A:1,B:2"), seed=3)
    assert [r.arrival_time for r in out] == [r.arrival_time for r in stream]
    assert len({r.request_id for r in out}) == len(stream)
    share_b = sum(r.client_id == "B" for r in out) / len(out)
    assert 0.62 < share_b < 0.71  # 2/3 up to sampling noise at n=3000
    assert [r.request_id for r in out if r.client_id == "A"][:3] == ["A-0", "A-1", "A-2"]
    assert out == assign_clients(stream, parse_clients("A:1,B:2"), seed=3)
    assert out != assign_clients(stream, parse_clients("A:1,B:2"), seed=4)
    assert assign_clients(stream, (), seed=3) == list(stream)
