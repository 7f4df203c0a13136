"""The aggregator's round engine: independent steps share message rounds.

A study step that talks to the sites is written as a *task*: a generator that yields the list
of requests it needs next and receives their replies (one ``{site: Reply}`` per request, in
order), and finally returns its result::

    def task(ctx):
        replies = yield [Request("glm_linear", ...)]
        ...
        return result

:func:`run_tasks` runs several tasks together: every round it collects the pending requests
of every live task, sends them as one batch (one message per site;
:meth:`~fedgen.federation.transport.Transport.query_many`), hands each task its replies and
advances it. Two phenotypes, a phenotype's allelic test and its regression, the logistic
IRLS rows and the Firth rows of the same phenotype therefore cost the rounds of the longest
of them, not the sum. Each request still takes its own pass through every site's pipeline.
Rounds are counted per task label in ``ctx.phase_rounds`` (the manifest's rounds per phase).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Generator

import numpy as np

from fedgen.federation.transport import Reply, Request

Replies = list[dict[str, Reply]]
Task = Generator[list[Request], Replies, Any]

log = logging.getLogger("fedgen.study")

#: blocks of one step sent in one round (bounds the size of a message)
BLOCKS_PER_ROUND = 4

#: seconds between progress lines of a long run of rounds
PROGRESS_EVERY = 5.0


def run_tasks(ctx: Any, tasks: dict[str, Task]) -> dict[str, Any]:
    """Run ``tasks`` (label → task) to completion, batching their requests per round."""
    results: dict[str, Any] = {}
    pending: dict[str, list[Request]] = {}

    def advance(label: str, value: Replies | None) -> None:
        gen = tasks[label]
        try:
            reqs = gen.send(value) if value is not None else next(gen)
        except StopIteration as stop:
            results[label] = stop.value
            pending.pop(label, None)
            return
        if not reqs:
            raise RuntimeError(f"task {label} yielded no request")
        pending[label] = list(reqs)

    for label in list(tasks):
        advance(label, None)
    from fedgen.progress import Progress

    # long phases (logistic IRLS, Firth, PCA): rounds done, time, and the tasks still running
    progress = Progress(getattr(ctx, "phase", None) or "rounds", None, unit="rounds", every=PROGRESS_EVERY)
    rounds = 0
    while pending:
        labels = list(pending)
        if rounds:
            progress.update(rounds, detail=f"{len(tasks) - len(pending)}/{len(tasks)} tasks done; running: " + ", ".join(
                f"{lab} ({len(pending[lab])} request{'s' if len(pending[lab]) > 1 else ''})" for lab in labels))
        rounds += 1
        batch = [r for lab in labels for r in pending[lab]]
        replies = ctx.query_many(batch)
        pos = 0
        for lab in labels:
            n = len(pending[lab])
            ctx.phase_rounds[lab] = ctx.phase_rounds.get(lab, 0) + 1
            mine, pos = replies[pos : pos + n], pos + n
            advance(lab, mine)
    return results


def run_task(ctx: Any, label: str, task: Task) -> Any:
    """One task on its own (its rounds still counted under ``label``)."""
    return run_tasks(ctx, {label: task})[label]


def sum_replies(replies: dict[str, Reply]) -> dict[str, np.ndarray]:
    """Elementwise sum of every array across sites (the combine step)."""
    total: dict[str, np.ndarray] = {}
    for rep in replies.values():
        for k, a in rep.arrays.items():
            total[k] = np.array(a, copy=True) if k not in total else total[k] + a
    return total


def combine_blocks(replies: Replies, unpack: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None
                   ) -> dict[str, np.ndarray]:
    """Sum each block's replies over sites, then concatenate the blocks (variant axis first)."""
    out: dict[str, list[np.ndarray]] = {}
    for block in replies:
        for k, v in sum_replies(block).items():
            out.setdefault(k, []).append(v)
    merged = {k: np.concatenate(v, axis=0) for k, v in out.items()}
    return unpack(merged) if unpack else merged
