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

Bound: requests stay in vLLM's engine (queued or running) from `add_request` until they finish,
so at most `max_requests` requests and `max_tokens` prompt tokens of this feed are in it at once
(`FeedLimits`; by default twice what one scheduler step can take: `2 x max_num_seqs` requests and
`2 x max(max_num_batched_tokens, max_model_len)` tokens, a full step running and the next one
waiting). A document-mode window of thousands of short documents is thousands of requests: a
`submit` that would pass a cap steps the engine (finished outputs go to their tickets) until the
next request fits, then adds it, so a group larger than the caps goes in as earlier requests
finish. A request alone longer than `max_tokens` is added once the engine holds none of ours.

Order: each group's outputs come back in the order its requests were submitted, whatever order
vLLM finishes them in (request ids are ours, mapped back). The engine is in-process and
stepped only from the caller's thread, so the schedule is a function of what was submitted and
when it was collected (and of the caps): the same groups fed the same way run the same steps.
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


@dataclass(frozen=True)
class FeedLimits:
    """The most requests and prompt tokens a feed keeps in vLLM's engine at once."""

    max_requests: int
    max_tokens: int


def feed_limits(llm_engine: Any, max_requests: int | None = None,
                max_tokens: int | None = None) -> FeedLimits:
    """The caps given, the others from the engine's scheduler (see module doc)."""
    if max_requests is None or max_tokens is None:
        try:
            scheduler = llm_engine.vllm_config.scheduler_config
            step_seqs, step_tokens = scheduler.max_num_seqs, scheduler.max_num_batched_tokens
            model_len = llm_engine.model_config.max_model_len
        except AttributeError as exc:
            raise EngineError(f"cannot read vLLM's scheduler limits ({exc}); give the feed "
                              "max_requests and max_tokens") from None
        if max_requests is None:
            max_requests = 2 * int(step_seqs)
        if max_tokens is None:
            max_tokens = 2 * max(int(step_tokens), int(model_len))
    return FeedLimits(max_requests=max_requests, max_tokens=max_tokens)


class RequestFeed:
    """Groups of requests submitted ahead to one in-process vLLM engine (see module doc).
    `max_requests` / `max_tokens`: the caps (at least 1; None: from vLLM's scheduler)."""

    def __init__(self, llm_engine: Any, max_requests: int | None = None,
                 max_tokens: int | None = None) -> None:
        self._engine = llm_engine
        self.limits = feed_limits(llm_engine, max_requests, max_tokens)
        self._counter = 0
        # request id -> (group, position, prompt tokens), while the request is in the engine
        self._where: dict[str, tuple[FeedTicket, int, int]] = {}
        self._tokens = 0  # prompt tokens of the requests in `_where`
        # what the caps held: the most requests / tokens in the engine at once, and the steps
        # that `submit` ran to make room
        self.peak_requests = self.peak_tokens = self.room_steps = 0

    @property
    def pending(self) -> int:
        """Requests in vLLM's engine (added, not yet finished)."""
        return len(self._where)

    def stats(self) -> dict[str, int]:
        """The caps and what they held so far."""
        return {"max_requests": self.limits.max_requests, "max_tokens": self.limits.max_tokens,
                "peak_requests": self.peak_requests, "peak_tokens": self.peak_tokens,
                "room_steps": self.room_steps}

    def submit(self, prompts: Sequence[dict], params: Sequence[Any]) -> FeedTicket:
        """Add one group's token-id prompts to vLLM's queue (they run during later `collect`s,
        and during this call when it has to make room under the caps)."""
        ticket = FeedTicket(ids=[], outputs=[None] * len(prompts), left=len(prompts))
        try:
            for position, (prompt, param) in enumerate(zip(prompts, params)):
                tokens = len(prompt["prompt_token_ids"])
                while self._where and not self._fits(tokens):
                    self._step("room under the feed's caps")
                    self.room_steps += 1
                self._add(ticket, position, prompt, param, tokens)
        except BaseException:  # the group is dropped: what is left of it leaves the engine
            self._abort(ticket.ids)
            raise
        return ticket

    def _add(self, ticket: FeedTicket, position: int, prompt: dict, param: Any,
             tokens: int) -> None:
        request_id = f"{_ID_PREFIX}{self._counter}"
        self._counter += 1
        try:
            self._engine.add_request(request_id, prompt, param)
        except (ValueError, TypeError) as exc:
            raise EngineError(f"vLLM refused a request of the group: {exc}") from exc
        ticket.ids.append(request_id)
        self._where[request_id] = (ticket, position, tokens)
        self._tokens += tokens
        self.peak_requests = max(self.peak_requests, len(self._where))
        self.peak_tokens = max(self.peak_tokens, self._tokens)

    def _fits(self, tokens: int) -> bool:
        return (len(self._where) < self.limits.max_requests
                and self._tokens + tokens <= self.limits.max_tokens)

    def collect(self, ticket: FeedTicket) -> list[Any]:
        """Step the engine until every request of `ticket` is finished; its outputs in
        submission order. Outputs of other groups that finish meanwhile are kept for them."""
        while ticket.left:
            self._step("this group's requests")
        return ticket.outputs

    def abandon(self) -> None:
        """Abort every request submitted and not collected (a caller that stopped mid-way),
        so that the engine's queue is empty for the next caller."""
        self._abort(list(self._where))

    def _step(self, waiting_for: str) -> None:
        """One engine step; finished outputs go to their tickets."""
        if not self._engine.has_unfinished_requests():
            raise EngineError(f"vLLM has no unfinished requests but {len(self._where)} of "
                              f"this feed's never finished (waiting for {waiting_for})")
        for out in self._engine.step():
            if out.finished:
                self._deliver(out)

    def _deliver(self, out: Any) -> None:
        # vLLM may extend the id internally ("<ours>-<random>"); ours has no "-"
        request_id = str(out.request_id).split("-", 1)[0]
        found = self._where.pop(request_id, None)
        if found is None:
            if request_id.startswith(_ID_PREFIX):
                return  # a request of a group abandoned before it finished
            raise EngineError(f"vLLM returned request {out.request_id!r}, which this feed never "
                              "submitted (another caller is stepping the same engine)")
        ticket, position, tokens = found
        self._tokens -= tokens
        ticket.outputs[position] = out
        ticket.left -= 1

    def _abort(self, request_ids: list[str]) -> None:
        # only those still in the engine (a group's first requests may have finished already)
        in_engine = [r for r in request_ids if r in self._where]
        for request_id in in_engine:
            self._tokens -= self._where.pop(request_id)[2]
        if in_engine:
            self._engine.abort_request(in_engine)
