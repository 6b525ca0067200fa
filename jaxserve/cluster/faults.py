"""What survives a replica failure: the tokens each unfinished request was given, and the
continuation that carries it on elsewhere.

A continuation is the request with its delivered tokens appended to the prompt and only the rest
left to generate, arriving at the router at the failure time; its KV (prompt and delivered tokens)
is recomputed where it lands, as a recompute preemption would. The user has the delivered tokens
already, so none is generated twice.
"""

from __future__ import annotations

import dataclasses

from jaxserve.request import Request


def unfinished_outputs(scheduler, state) -> dict[str, tuple[int, ...]]:
    """Generated ids of every unfinished request in a scheduler ``state``: running rows, waiting
    (preempted) and swapped requests (a request that has generated nothing maps to ``()``)."""
    run = state.running
    out = dict(zip(run.ids, state.running_outputs()))
    for seq in list(scheduler.order.items(state.waiting)) + list(state.swapped.sorted_items()):
        out[seq.request_id] = tuple(seq.outputs[: seq.num_output])
    return out


def continuation(request: Request, outputs: tuple[int, ...], delivered: int, now: float) -> Request:
    """``request`` carried on at ``now`` after ``delivered`` of its tokens reached the user:
    prompt + those tokens, ``max_new_tokens`` minus them. ``outputs`` are the generated ids the
    replica held (real ids are needed only for requests with real prompt ids)."""
    remaining = request.sampling.max_new_tokens - delivered
    if remaining < 1:
        raise ValueError(f"request {request.request_id!r} has all its tokens; it has no continuation")
    sampling = dataclasses.replace(request.sampling, max_new_tokens=remaining)
    if request.has_real_tokens and delivered:
        if len(outputs) < delivered:
            raise ValueError(f"request {request.request_id!r}: {delivered} tokens delivered but the replica "
                             f"holds {len(outputs)} generated ids")
        ids = tuple(request.prompt_token_ids) + tuple(outputs[:delivered])
        return dataclasses.replace(request, prompt_token_ids=ids, prompt_len=None, sampling=sampling,
                                   arrival_time=now, prefix_block_hashes=None)  # fmt: skip
    if request.has_real_tokens:
        return dataclasses.replace(request, sampling=sampling, arrival_time=now)
    return dataclasses.replace(request, prompt_token_ids=None, prompt_len=request.prompt_len + delivered,
                               sampling=sampling, arrival_time=now)  # fmt: skip
