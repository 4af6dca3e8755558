"""Continuous batching: a FIFO of waiting sequences and two slot pools (target, assistant).

Slots are handed out lowest-first, so the running target rows stay packed into [0, max used]
and a decode step attends over a cache *view* rather than a gathered copy.
"""

from __future__ import annotations

import heapq
from collections import deque

from unlearn_serve.server.engine.sequence import Request, Sequence


class SlotPool:
    def __init__(self, size: int):
        self.size = size
        self._free = list(range(size))
        heapq.heapify(self._free)
        self.used: set[int] = set()

    def take(self) -> int:
        slot = heapq.heappop(self._free)
        self.used.add(slot)
        return slot

    def give(self, slot: int) -> None:
        self.used.remove(slot)
        heapq.heappush(self._free, slot)

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def high_water(self) -> int:
        """Rows a decode step must cover: 1 + the highest slot in use (0 when empty)."""
        return max(self.used) + 1 if self.used else 0


class Scheduler:
    def __init__(self, max_num_seqs: int, max_prefill_tokens: int):
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Sequence] = {}  # target slot -> sequence
        self.target_slots = SlotPool(max_num_seqs)
        self.assistant_slots = SlotPool(max_num_seqs)
        self.version = 0  # bumped whenever the running set changes (cached batch tensors go stale)

    def resize(self, slots: int) -> None:
        """Change the slot count (the KV budget's), before any sequence runs."""
        if self.running:
            raise RuntimeError("cannot resize the slot pools while sequences run")
        self.max_num_seqs = slots
        self.target_slots = SlotPool(slots)
        self.assistant_slots = SlotPool(slots)
        self.version += 1

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def num_waiting_sequences(self) -> int:
        return sum(len(r.sequences) for r in self.waiting)

    def admit(self) -> list[Sequence]:
        """Move whole requests (all `n` sequences) from the queue into free slots, FIFO."""
        admitted: list[Sequence] = []
        longest = 0
        while self.waiting:
            request = self.waiting[0]
            n = len(request.sequences)
            needs_assistant = getattr(request.backend, "uses_assistant", False)
            if n > self.target_slots.free or (needs_assistant and n > self.assistant_slots.free):
                break
            new_longest = max(longest, len(request.prompt_token_ids))
            rows = len(admitted) + n
            if admitted and rows * new_longest > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            longest = new_longest
            for seq in request.sequences:
                seq.slot = self.target_slots.take()
                if needs_assistant:
                    seq.assistant_slot = self.assistant_slots.take()
                self.running[seq.slot] = seq
                admitted.append(seq)
        if admitted:
            self.version += 1
        return admitted

    def release(self, seq: Sequence) -> None:
        if seq.slot < 0:
            return
        self.running.pop(seq.slot, None)
        self.target_slots.give(seq.slot)
        seq.slot = -1
        if seq.assistant_slot >= 0:
            self.assistant_slots.give(seq.assistant_slot)
            seq.assistant_slot = -1
        self.version += 1

    def remove_waiting(self, request: Request) -> bool:
        try:
            self.waiting.remove(request)
            return True
        except ValueError:
            return False
