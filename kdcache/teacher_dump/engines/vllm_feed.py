"""vLLM's request queue kept fed across groups: submit the next group before this one is back.

`LLM.encode` is a blocking call: it adds one group's requests, steps vLLM's engine until they
are all finished and returns. Called once per group, the scheduler runs out of work at the end
of every call (the last steps of a group run at whatever batch is left) and waits while the
caller hands the results over and prepares the next call. `RequestFeed` talks to the
`LLMEngine` that the `LLM` object holds (`add_request`, `step`, `has_unfinished_requests`,
`abort_request`: vLLM's documented in-process API, the same in 0.25 and 0.32): the caller adds a
group's requests (`submit`), adds the next group's, and then `collect`s the first, which steps
the engine until that group's requests are all finished. Requests of later groups are already
in vLLM's waiting queue, so the steps that finish one group also start the next (chunked
prefill fills each step's token budget across groups), and outputs of later groups that finish
early are kept for their own `collect`.

Order: each group's outputs come back in the order its requests were submitted, whatever order
vLLM finishes them in (request ids are ours, mapped back). The engine is in-process and
stepped only from the caller's thread, so the schedule is a function of what was submitted and
when it was collected: the same groups fed the same way run the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from kdcache.teacher_dump.engines.base import EngineError

_ID_PREFIX = "kdfeed"  # our request ids: never an integer, so never one `LLM` itself assigns


@dataclass
class FeedTicket:
    """One submitted group: its request ids in submission order, and outputs as they finish."""

    ids: list[str]
    outputs: list[Any] = field(default_factory=list)
    left: int = 0


class RequestFeed:
    """Groups of requests submitted ahead to one in-process vLLM engine (see module doc)."""

    def __init__(self, llm_engine: Any) -> None:
        self._engine = llm_engine
        self._counter = 0
        self._where: dict[str, tuple[FeedTicket, int]] = {}  # request id -> (group, position)

    @property
    def pending(self) -> int:
        """Requests submitted and not yet collected."""
        return len(self._where)

    def submit(self, prompts: Sequence[dict], params: Sequence[Any]) -> FeedTicket:
        """Add one group's requests to vLLM's queue (they run during later `collect`s)."""
        ticket = FeedTicket(ids=[], outputs=[None] * len(prompts), left=len(prompts))
        try:
            for position, (prompt, param) in enumerate(zip(prompts, params)):
                request_id = f"{_ID_PREFIX}{self._counter}"
                self._counter += 1
                self._engine.add_request(request_id, prompt, param)
                ticket.ids.append(request_id)
                self._where[request_id] = (ticket, position)
        except (ValueError, TypeError) as exc:  # vLLM refused a request: none of this group runs
            self._abort(ticket.ids)
            raise EngineError(f"vLLM refused a request of the group: {exc}") from exc
        return ticket

    def collect(self, ticket: FeedTicket) -> list[Any]:
        """Step the engine until every request of `ticket` is finished; its outputs in
        submission order. Outputs of other groups that finish meanwhile are kept for them."""
        while ticket.left:
            if not self._engine.has_unfinished_requests():
                missing = [i for i, o in zip(ticket.ids, ticket.outputs) if o is None]
                raise EngineError(f"vLLM has no unfinished requests but {len(missing)} of this "
                                  f"group's never finished (first: {missing[0]})")
            for out in self._engine.step():
                if out.finished:
                    self._deliver(out)
        return ticket.outputs

    def abandon(self) -> None:
        """Abort every request submitted and not collected (a caller that stopped mid-way),
        so that the engine's queue is empty for the next caller."""
        self._abort(list(self._where))

    def _deliver(self, out: Any) -> None:
        # vLLM may extend the id internally ("<ours>-<random>"); ours has no "-"
        request_id = str(out.request_id).split("-", 1)[0]
        found = self._where.pop(request_id, None)
        if found is None:
            if request_id.startswith(_ID_PREFIX):
                return  # a request of a group abandoned before it finished
            raise EngineError(f"vLLM returned request {out.request_id!r}, which this feed never "
                              "submitted (another caller is stepping the same engine)")
        ticket, position = found
        ticket.outputs[position] = out
        ticket.left -= 1

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._where.pop(request_id, None)
        if request_ids:
            self._engine.abort_request(request_ids)
