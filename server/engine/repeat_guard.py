"""The unlearning must not start a repetition: a guard on the answers it changed, from the first change on.

Where the unlearning removes the target's choice (a remembered name), the token that wins instead is the target's
next best, and on a small model that is often a copy of the text so far: "He created the first draft of the[ first|
Harry][ draft| Harry] of the first draft of …" (docs/benchmarks.md, the trace of the SmolLM2 demo: the loop enters at
a substitution and the target itself then keeps it going). The target alone would not have written that copy; the
unlearning chose it.

So at a *substituted* position (the unlearned winner differs from the target's own best token) every candidate that
would complete an n-gram already in the answer gets -inf (HF's `no_repeat_ngram_size`, but only where the unlearning
acts). By default (`EngineConfig.repeat_guard_after_substitution`) the guard then stays on for the rest of that
answer, at the target's own choices too: the target steered off the fact it wanted to write often loops on its own a
few tokens later ("the White Oak Manor, a fantasy fantasy fantasy …", the SmolLM2 demo's gated build: 7 of 16 forget
answers looped with the guard on substituted positions only, 1 of 16 with it on for the rest of the answer; the base
3 of 16). At every guarded position a third copy of one token in a row is removed too (no trigram repeats yet, but the
answer loops). Answers the unlearning never changed, and answers without unlearning, are the target's own, untouched.
A row whose every finite candidate would repeat keeps its unlearned logits as they were (the guard never leaves a row
without a token). It only removes candidates: a token the unlearning pushed down is never raised by it.

Tensor-only over [R, L] output histories (an `unfold`, a gather and scatters): no host sync, no loop over rows.
"""

from __future__ import annotations

import torch

# n-gram size of the guard: EngineConfig.no_repeat_substitution's default; 0 = off. Chosen by bench/uld_quality.py
# (docs/benchmarks.md, "The repeat guard": n = 2 blocks ordinary substitutes too and costs fluency).
DEFAULT_NO_REPEAT_NGRAM = 3


def repeat_completions(history: torch.Tensor, lengths: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens that would complete an n-gram already in each row's output, sparse: `(followers, repeats)`, both
    [R, W] (W = L - n + 1 n-gram starts, plus one column for a third copy of one token in a row when n > 1);
    `followers[r, w]` repeats an n-gram (or that run) where `repeats[r, w]`.

    `history`: [R, L] output token ids (only the first `lengths[r]` of row r are real), `lengths`: [R]. Sparse, so a
    step touches R x W entries, not R x V (a vocabulary of 49k is ~1000x the output so far)."""
    rows, width = history.shape
    if width < n:
        empty = history.new_zeros(rows, 0, dtype=torch.long)
        return empty, empty.bool()
    lengths = lengths.clamp_max(width)
    windows = history.unfold(1, n, 1)  # [R, W, n]: every n-gram start
    if n > 1:
        # the answer's last n-1 tokens (positions lengths-n+1 .. lengths-1; rows too short match nothing)
        offsets = torch.arange(n - 1, device=history.device)
        last = (lengths[:, None] - (n - 1) + offsets[None, :]).clamp_min(0)
        context = history.gather(1, last)  # [R, n-1]
        repeats = (windows[..., : n - 1] == context[:, None, :]).all(dim=-1)
    else:
        repeats = torch.ones(windows.shape[:2], dtype=torch.bool, device=history.device)
    # a window counts when it lies inside the output and its context is a real one (length >= n - 1)
    start = torch.arange(windows.shape[1], device=history.device)
    repeats &= (start[None, :] + n <= lengths[:, None]) & (lengths[:, None] >= n - 1)
    followers = windows[..., n - 1].long()
    if n > 1:
        # a third copy of one token in a row ("fantasy fantasy fantasy"): no n-gram repeats yet for n > 2, but the
        # answer loops (training/leak.py `has_loop`); the answer's last token is banned where it already ends twice
        last_two = history.gather(1, (lengths[:, None] - 2 + torch.arange(2, device=history.device)).clamp_min(0))
        twice = (last_two[:, :1] == last_two[:, 1:]) & (lengths[:, None] >= 2)
        followers = torch.cat([followers, last_two[:, 1:].long()], dim=1)
        repeats = torch.cat([repeats, twice], dim=1)
    return followers, repeats


def substituted_rows(logits: torch.Tensor, target_best: torch.Tensor) -> torch.Tensor:
    """[R] bool: the target's own best token `target_best` [R] no longer wins in the unlearned [R, V] `logits` (a tie
    with the winner counts as kept)."""
    return logits.gather(1, target_best[:, None]).squeeze(1) < logits.amax(dim=-1)


def guard_substitutions(
    logits: torch.Tensor,
    target_best: torch.Tensor,
    followers: torch.Tensor,
    repeats: torch.Tensor,
    diverged: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place: -inf for the repeating `followers` (`repeat_completions`) of the rows whose winner in the [R, V]
    unlearned `logits` is not the target's own best token `target_best` [R]; a row that would be left without a
    finite logit keeps its logits. Returns `logits`.

    `diverged` ([R] bool, updated in place): the rows whose answer the unlearning already changed at an earlier
    position; they are guarded at every position, the target's own choices included (module docstring).

    Two `amax` reads of [R, V] and writes of [R, W] only: the guard runs every decode step."""
    substituted = substituted_rows(logits, target_best)
    if diverged is not None:
        diverged |= substituted
        substituted = diverged
    if followers.shape[1] == 0:
        return logits
    banned = repeats & substituted[:, None]
    original = logits.gather(1, followers)
    # amin with +inf / -inf: a token banned by any of its windows ends at -inf (no last-write-wins between windows)
    ban = torch.where(banned, float("-inf"), float("inf")).to(logits.dtype)
    logits.scatter_reduce_(1, followers, ban, "amin")
    dead = logits.amax(dim=-1) == float("-inf")
    # a dead row gets its followers' values back; other rows write the values they now hold (duplicates agree)
    logits.scatter_(1, followers, torch.where(dead[:, None], original, logits.gather(1, followers)))
    return logits
