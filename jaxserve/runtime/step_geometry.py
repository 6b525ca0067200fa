"""The shape of an engine step, without jax: bucket sizes, and the work one jitted step does.

``packing.pack`` pads a BatchPlan to a bucketed ``(num_decode_rows, num_blocks)`` shape; the jitted
step then does work that follows that padded shape, not the plan's real token counts.
``StepGeometry.work`` computes that work from the rows alone, so the profiler and the profiled
simulator cost model (``jaxserve.sim.profiled_cost_model``) see a step exactly as the engine runs it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ATTENTION_KINDS = ("grouped", "ragged")


def bucket(n: int, minimum: int = 1, per_octave: int = 1) -> int:
    """0 for 0, else the smallest size >= max(n, minimum) on a grid of ``per_octave`` evenly spaced
    sizes between consecutive powers of two (1: powers of two; 4: ..., 256, 320, 384, 448, 512),
    so at most ``1 / (per_octave + 1)`` of a step's rows are padding."""
    if n <= 0:
        return 0
    n = max(int(n), minimum)
    power = 1 << (n - 1).bit_length()
    step = max(1, power // 2 // per_octave)
    return -(-n // step) * step


def bucket_sizes(n: int, minimum: int = 1, per_octave: int = 1) -> list[int]:
    """0 and every bucket size (see ``bucket``) up to n's bucket, ascending."""
    top, sizes = bucket(n, minimum, per_octave), [0]
    while n > 0 and sizes[-1] < top:
        sizes.append(bucket(sizes[-1] + 1, minimum, per_octave))
    return sizes


WORK_TERMS = (
    "token_rows", "sample_slots", "decode_attention_keys", "decode_kv_read", "prefill_attention_keys",
    "prefill_kv_read", "num_seqs",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class StepGeometry:
    """What fixes a step's padded shape and attention loop: the runner's packing parameters.

    ``attention``: "grouped" (chunked jnp: every row of a group visits the group's longest KV in
    chunks of ``chunk_pages`` pages) or "ragged" (the kernel visits each sequence's own pages)."""

    attention: str = "grouped"
    page_size: int = 16
    block_rows: int = 32  # rows per prefill block
    chunk_pages: int = 8
    decode_per_octave: int = 2
    blocks_per_octave: int = 4
    min_decode_rows: int = 1
    min_blocks: int = 1

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        for f in dataclasses.fields(self)[1:]:
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name} must be an int >= 1, got {value!r}")

    def shape(self, num_decodes: int, num_blocks: int) -> tuple[int, int]:
        """The bucketed ``(decode rows, prefill blocks)`` a step of that many is padded to."""
        return (
            bucket(num_decodes, self.min_decode_rows, self.decode_per_octave),
            bucket(num_blocks, self.min_blocks, self.blocks_per_octave),
        )

    def work(self, prefill_new, prefill_context, decode_context) -> tuple[float, ...]:
        """The step's work terms ``WORK_TERMS``, floats, for prefill rows of ``prefill_new`` (each >= 2)
        new tokens after ``prefill_context`` tokens, and decode rows with ``decode_context`` tokens
        already in KV (int arrays):

        * ``token_rows``: padded rows through the layers' matmuls, ``D + NB * block_rows``;
        * ``sample_slots``: padded sequence slots through the LM head and sampler, ``D + NB``;
        * ``decode_attention_keys``: query-key scores the decode attention computes;
        * ``decode_kv_read``: keys whose KV the decode rows read, ``sum(context + 1)``;
        * ``prefill_attention_keys``: query-key scores the prefill blocks' attention computes;
        * ``prefill_kv_read``: keys whose KV the prefill blocks read (each block its sequence's);
        * ``num_seqs``: real rows (the host packs each one).

        Grouped attention computes every row of a group against the group's longest KV in whole
        chunks, but a row reads only its own pages (past its table it re-reads one padding page,
        which stays cached), so compute follows the padded shape and memory traffic the real one.
        The ragged kernel computes each sequence's own (causal) keys.
        """
        n = np.asarray(prefill_new, np.int64)
        c = np.asarray(prefill_context, np.int64)
        dc = np.asarray(decode_context, np.int64)
        blocks_per = -(-n // self.block_rows)
        d_pad, nb_pad = self.shape(len(dc), int(blocks_per.sum()))
        rows = d_pad + nb_pad * self.block_rows
        dec_read = float(dc.sum() + len(dc))
        pre_read = float(np.dot(blocks_per, c + n))
        if self.attention == "grouped":
            chunk = self.chunk_pages * self.page_size
            dec_keys = float(d_pad * self._visited(int(dc.max()) + 1, chunk)) if len(dc) else 0.0
            pre_keys = float(nb_pad * self.block_rows * self._visited(int((c + n).max()), chunk)) if len(n) else 0.0
        else:
            dec_keys = dec_read
            # Σ n·(c + (n+1)/2): each new token sees the prior context and the chunk causally.
            pre_keys = float(np.dot(n, c)) + 0.5 * (float(np.dot(n, n)) + float(n.sum()))
        return float(rows), float(d_pad + nb_pad), dec_keys, dec_read, pre_keys, pre_read, float(len(n) + len(dc))

    def decode_work(self, num_rows: int, context_tokens: int, max_context: int, k: int):
        """``work`` of k consecutive decode-only steps of the same ``num_rows`` rows (contexts summing
        to ``context_tokens``, the longest ``max_context``, at the first; each step adds one token per
        row), as float64 arrays [k] where they vary; equal to ``work`` step by step."""
        steps = np.arange(k, dtype=np.int64)
        d_pad, _ = self.shape(num_rows, 0)
        read = (context_tokens + num_rows * steps + num_rows).astype(np.float64)
        if self.attention == "grouped":
            chunk = self.chunk_pages * self.page_size
            keys = (d_pad * (-(-(max_context + 1 + steps) // chunk) * chunk)).astype(np.float64)
        else:
            keys = read
        return float(d_pad), float(d_pad), keys, read, 0.0, 0.0, float(num_rows)

    @staticmethod
    def _visited(max_kv: int, chunk: int) -> int:
        """KV positions the grouped loop visits for a group whose longest KV is ``max_kv``."""
        return -(-max_kv // chunk) * chunk

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
