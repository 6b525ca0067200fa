"""The plain-CSV fast path of the trace reader reads every text exactly as csv.reader's path does:
the same trace, or the same error naming the same line."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from jaxserve.workload.traces import TraceFormatError, _plain_columns, _read_csv

GOOD = {"azure": "2023-11-16 18:15:{:02d}.{:07d}", "vidur": "{}.{}"}
HEADERS = {"azure": ["TIMESTAMP", "ContextTokens", "GeneratedTokens"], "vidur": ["arrived_at", "num_prefill_tokens", "num_decode_tokens"],
           "lengths": ["num_prefill_tokens", "num_decode_tokens"]}  # fmt: skip
ODD_CELLS = ["", " ", "0", "-3", "1.0", "1.5", "x", "now", '"7"', "9 ", "2023-02-30 00:00:00"]


@st.composite
def csv_texts(draw):
    """A trace CSV for ``fmt``: a header with an extra column somewhere, rows of good values, some
    odd cells, blank, short and long lines, quotes, Windows or lone carriage-return line ends."""
    fmt = draw(st.sampled_from(sorted(HEADERS)))
    header = list(HEADERS[fmt])
    header.insert(draw(st.integers(0, len(header))), "extra")
    rows = []
    for r in range(draw(st.integers(0, 6))):
        row = []
        for name in header:
            if name.lower() in ("timestamp", "arrived_at"):
                row.append(GOOD[fmt].format(r, draw(st.integers(0, 10**7 - 1))) if fmt == "azure" else f"{r}.{draw(st.integers(0, 9))}")
            else:
                row.append(str(draw(st.integers(1, 5000))))
        if draw(st.integers(0, 5)) == 0:
            row[draw(st.integers(0, len(row) - 1))] = draw(st.sampled_from(ODD_CELLS))
        kind = draw(st.integers(0, 9))
        line = ",".join(row[:-1] if kind == 0 else row + ["z"] if kind == 1 else [] if kind == 2 else row)
        rows.append(line)
    end = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    lines = [",".join(header)] + rows
    if draw(st.integers(0, 9)) == 0:  # line ends mixed: each its own
        text = "".join(line + draw(st.sampled_from(["\n", "\r\n", "\r"])) for line in lines)
    else:
        text = end.join(lines) + draw(st.sampled_from(["", end, end + end]))
    if draw(st.integers(0, 9)) == 0:  # a blank first line, or one of blank fields: the header is on the next
        text = draw(st.sampled_from(["", ",".join(" " * len(header))])) + end + text
    return fmt, text


def read(text, fmt, plain):
    try:
        trace = _read_csv("t.csv", text, fmt, plain=plain)
    except TraceFormatError as e:
        return str(e)
    return trace.arrival_s, trace.prompt_len, trace.output_len


@settings(max_examples=400, deadline=None)
@given(csv_texts())
def test_the_plain_path_reads_what_the_reader_reads(case):
    fmt, text = case
    fast, slow = read(text, fmt, True), read(text, fmt, False)
    if isinstance(slow, str):
        assert fast == slow
    else:
        assert not isinstance(fast, str), fast
        for a, b in zip(fast, slow):
            assert (a is None and b is None) or np.array_equal(a, b)


def test_the_plain_path_takes_plain_files_and_leaves_the_rest_to_the_reader():
    plain = "TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:15:46.6805900,374,44\r\n"
    header, index, columns, lines = _plain_columns("t.csv", plain, "azure")
    assert index == [0, 1, 2] and columns == [["2023-11-16 18:15:46.6805900"], ["374"], ["44"]] and lines == [2]
    mixed_ends = "num_prefill_tokens,num_decode_tokens,x\r\n1,2\r3,4\r\n"  # "1,2\r3,4" looks like one row of three
    for other in ('a,"b",c\n1,2,3\n', "a,b,c\n1,2\n", "a,b,c\n\n1,2,3\n", "a,b,c\r1,2,3\r", "\na,b,c\n1,2,3\n", "a,b,c\n", mixed_ends):
        assert _plain_columns("t.csv", other, "lengths") is None, other
