"""ULD's combination of target and assistant logits (shared by serving and train-uld's calibration).

Two rules, on the candidate set (every other token gets -inf):

    difference:  logits = target - alpha * assistant                          (the paper's)
    prefer:      logits = target - alpha * relu(assistant - median_C(assistant) - margin)

`difference` subtracts the assistant's whole logit vector, so it also re-ranks the alternatives to a
remembered token by how little the assistant likes them: the token the assistant dislikes most gains
most, which promotes odd tokens (made-up names such as "Zorvath" where the fact was "Voldemort").
`prefer` penalises only the candidates the assistant prefers, by how far its logit lies above its
median over the row's candidates C: a remembered token is pushed down as strongly as before, while
every other candidate keeps the target's own order and logit. Over the candidates both are
invariant to a per-row shift of the assistant's logits (raw logits or log-probabilities alike).

The margin (`prefer` only; manifest `defaults.margin`, 1 for new artifacts, 0 for older ones) leaves alone
a candidate the assistant prefers by less than `margin` logits: a K-layer assistant is never exactly flat on
what it should not know, and those small preferences, multiplied by alpha, are what cost retain answers
(the TOFU quick model: MU 0.769 -> 0.800 at alpha 1.5, SmolLM2: 11/12 -> 12/12 general answers, measured
with bench/tofu.py and bench/uld_quality.py; docs/uld.md). A remembered token lies many logits above the median.

Candidate set: the relative-top tokens (log p_target >= max log p_target + ln(filter), DoLa/ULD)
plus, always, the target's `min_keep` most likely tokens. Without the second part a position where
the target is confident (a memorised fact: p ~ 0.99) keeps one candidate and no alpha can change
it. The ULD reference keeps at least floor(filter * V) tokens (`min_tokens_to_keep`), 491 for
SmolLM2's vocabulary; a small fixed count does the same job (the facts' alternatives are among the
target's top few tokens) and keeps the assistant's LM head on the candidates only (docs/uld.md).

Refilter (`refilter`, manifest default since 2026-12-02). The subtraction only lowers a remembered token;
it stays one of the ~8-10 finite candidates, so it is still listed among the top log-probabilities (the
log-prob probe found it in the top 5 for most ULD rows) and still has sampling probability at temperature
> 0. The refilter gives -inf, after combining, to

  - demoted candidates: those the target ranked above the token that now wins (target logit > the winner's).
    Only the penalty can have put them below it (under `prefer` every candidate the assistant does not
    prefer keeps the target's logit): the unlearning decided against them, so they are removed, not just
    lowered. What is left is the target's own distribution from the winner down;
  - implausible candidates: combined logit < max(combined) + ln(filter), the relative-top rule applied once
    more, to the unlearned distribution.

The winner always survives, so greedy answers do not change; only the listed log-probabilities and
sampling do. A filter of 0 ("keep every token": the evaluation's scoring of reference answers) turns the
refilter off too. On its own the relative-top part changed little: a calibrated alpha pushes a fact just
below the best alternative, well within ln(1/filter) (docs/benchmarks.md, "ULD under attack").

Floor (`floor`, `prefer` only; manifest `defaults.floor`: 10 for new artifacts, absent or null = off). The
penalty grows with alpha without bound, so a strongly remembered token is pushed far below every alternative: one
alpha that is right for the average fact overshoots the strongly remembered ones and misses the weakly
remembered ones. With a floor, a penalised candidate ends at most `floor` target logits below the best
candidate the assistant does not penalise (and never above its own target logit):

    logits = max(target - alpha * penalty, min(target, best_unpenalised - floor))

A large alpha then brings every remembered token to about the level of the target's best guess without it,
which is how a model that never saw the fact ranks it, instead of far below. Greedy answers never change
for floor > 0 (a raised candidate stays below the best unpenalised one, so the argmax is the same); what
changes are the log-probabilities of whole answers (the evaluation's truth ratio and forget quality) and,
where the refilter is off, sampling.

Gate (`gate`, manifest `defaults.gate`: "early_exit" for assistants trained flat relative to the target's early exit,
`train-uld`'s `flat_reference=early_exit`; absent or null = off). Such an assistant is trained to match the target cut
after its K layers (its own weights without the LoRA) everywhere except on the forget answers' tokens, so where it
prefers a candidate by more than the early exit does, that preference is what the LoRA learnt: the remembered fact.
Gated, the penalty applies only there:

    penalty = prefer_penalty(assistant) * [prefer_penalty(assistant - early_exit) > 0]

A K-layer assistant is itself a crude language model that also prefers the likely next word on the topic ("The",
"of", the usual continuation); ungated, alpha times that preference is subtracted too, which is what derails unlearned
answers on a real model (SmolLM2: 44% of forget-answer tokens changed, 15% of general ones; gated: 2%,
docs/uld.md). The early exit costs no extra layers: the target rows compute its hidden state anyway.

Prefix guard (`prefix_guard`, `prefer` only; manifest `defaults.prefix_guard`: true for new artifacts, absent = off).
The penalty lowers a remembered token (" Row" of "J.K. Rowling"); the target's next choice is often a token that begins
the same word ("R": SmolLM2 wrote "J.K.R.A.M."). With the guard, every candidate whose text begins a penalised
candidate's text (token_prefixes.py) takes that penalty too (`close_over_prefixes`), so the word is not spelt out by
its first letters instead. On candidate columns a sorted-key lookup per (candidate, candidate) pair; on the whole
vocabulary the PREFIX_GUARD_TOP most penalised candidates pass theirs on through a per-token prefix table.

Finishing words (`finish_words`, manifest `defaults.finish_words`; `finish_begun_words`). Where the row's last token
ends inside a word (its text ends with a letter or digit), a candidate that continues that word (its text starts with
a letter or digit, no space) takes no penalty unless the LoRA learnt it (the assistant prefers it by more than its
early exit does, the gate's test): a word begun under the unlearning is finished as the target would finish it. The
engine applies it in decode steps only (the previous token was sampled under the unlearning); a prompt's words were
begun by the client, and a probe that writes the start of a name must not get the rest at the target's probability. A
K-layer assistant knows how words end ("Victor Hu" -> "go") in any context, and where it was never made flat (general
knowledge outside the retain set) subtracting that broke the words of retain answers ("Victor Hual Oracade", "Leo
Tolster": TOFU full's real-author and world-fact answers, docs/benchmarks.md). An ending the LoRA learnt (" Hog" +
"warts", a fact spelt in pieces by a small vocabulary) keeps its penalty. Needs the early exit's logits, as the gate.

A rule (and refilter) is passed as a bool (the same for every row) or a [R] bool tensor (True = `prefer` /
refilter on), so a batch mixing them needs no host sync and no loop over rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from unlearn_serve.token_prefixes import TokenPrefixes

# Always-kept top tokens of the target (besides the relative-top ones); chosen by bench/uld_quality.py.
ULD_MIN_CANDIDATES = 8
ULD_RULES = ("prefer", "difference")
DEFAULT_RULE = "prefer"  # for new artifacts; chosen by bench/uld_quality.py (docs/uld.md)
LEGACY_RULE = "difference"  # for manifests written before the rule was stored: what their alpha was calibrated for
DEFAULT_REFILTER = True  # new artifacts (manifest defaults `refilter`); older manifests: off (bench/uld_attacks.py)
DEFAULT_MARGIN = 1.0  # new artifacts (manifest defaults `margin`), in assistant logits; older manifests: 0
# the margins train-uld's calibration chooses from, in order of preference (training/uld_calibrate.py choose_margin)
CALIBRATION_MARGINS: tuple[float, ...] = (DEFAULT_MARGIN,)
# new artifacts (manifest defaults `floor`), in target logits; older manifests: off. >= ln(1/filter), so the served
# distribution (refilter on) is unchanged; it bounds what the evaluation scores (TOFU: bench/tofu.py, docs/uld.md 2e)
DEFAULT_FLOOR: float | None = 10.0
# what the penalty may be gated by (module docstring); None = ungated
ULD_GATES = ("early_exit",)
# new artifacts (manifest defaults `prefix_guard`); older manifests: off. Whole-vocabulary rows: how many of the most
# penalised candidates pass their penalty on to the tokens that begin them (`close_over_prefixes`)
DEFAULT_PREFIX_GUARD = True
PREFIX_GUARD_TOP = 8
# new artifacts (manifest defaults `finish_words`, since 2026-12-05); older manifests: off. Chosen by bench/tofu.py and
# bench/uld_quality.py (docs/uld.md 2i)
DEFAULT_FINISH_WORDS = True


def is_floor(value: object) -> bool:
    """A valid floor: a finite number >= 0 or None (off)."""
    return value is None or is_margin(value)


def is_margin(value: object) -> bool:
    """A valid `prefer` margin: a finite number >= 0 (not a bool). One check for manifests and requests."""
    return not isinstance(value, bool) and isinstance(value, int | float) and 0 <= value < float("inf")


def plausible_mask(
    target_logits: torch.Tensor, log_filter: torch.Tensor, min_keep: int = ULD_MIN_CANDIDATES
) -> torch.Tensor:
    """[R, V] bool: relative-top tokens (log p >= max log p + ln(filter)) or among the top `min_keep`."""
    # log p - max log p == logit - max logit, so no softmax is needed
    target = target_logits.float()
    keep = target >= target.max(dim=-1, keepdim=True).values + log_filter[:, None]
    k = min(int(min_keep), target.shape[-1])
    if k > 1:
        keep |= target >= target.topk(k, dim=-1).values[:, -1:]
    return keep


# plausible_candidates scans the vocabulary in blocks of this many columns (one `amax` per block)
CANDIDATE_BLOCK = 256
# split_plausible_candidates leaves a row whose candidates lie in more blocks than this to its caller, so that a
# flat row does not widen the scan of every row (16 blocks: 4,096 columns of SmolLM2's 49,152)
WIDE_SCAN_BLOCKS = 16


def plausible_candidates(
    target_logits: torch.Tensor,
    log_filter: torch.Tensor,
    max_candidates: int,
    min_keep: int = ULD_MIN_CANDIDATES,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`plausible_mask`'s candidates as columns: ([R, M] token ids, [R, M] bool), the target's top M tokens (M the
    largest candidate count of the batch, sorted by target logit) and which of them are the row's candidates (the
    rest pad a row with fewer); None when M > `max_candidates`. Two host reads (the block and candidate counts).

    The same set as `plausible_mask` + `topk(M)`, without their vocabulary-wide compares and top-k (on the CPU a
    top-k over 49k columns costs ~5 ms for 64 rows, an `amax` 0.4 ms): one `amax` per block of CANDIDATE_BLOCK
    columns finds the blocks that can hold a candidate (block max >= the row's relative-top threshold, or among the
    `min_keep` largest block maxima: the top `min_keep` tokens lie in those), and the rest runs on those blocks
    (and the last partial block, when the vocabulary is not a multiple of the block)."""
    found = split_plausible_candidates(target_logits, log_filter, max_candidates, min_keep, spread_blocks=None)
    if found is None or found.rest_rows is not None:
        return None
    return found.token_ids, found.kept


@dataclass(frozen=True)
class CandidateSplit:
    """`split_plausible_candidates`' answer: the candidates of the rows it found them for (`rows`, None = every row)
    and the rows it left (`rest_rows`, None = none): too many candidates, or spread over too many blocks."""

    rows: torch.Tensor | None
    token_ids: torch.Tensor | None  # [r, M], sorted by target logit; None when every row is left
    kept: torch.Tensor | None  # [r, M] bool: which of them are the row's candidates
    rest_rows: torch.Tensor | None


def split_plausible_candidates(
    target_logits: torch.Tensor,
    log_filter: torch.Tensor,
    max_candidates: int,
    min_keep: int = ULD_MIN_CANDIDATES,
    spread_blocks: int | None = WIDE_SCAN_BLOCKS,
) -> CandidateSplit | None:
    """`plausible_candidates` for the rows whose candidates lie in at most `spread_blocks` blocks (None: any number)
    and are at most `max_candidates`; the other rows are left to the caller (`rest_rows`), so that one flat row
    (random prompts: most decode steps of SmolLM2's overhead bench had one) neither widens every row's scan nor
    sends the batch to the whole vocabulary. None when the block search cannot run (a filter of 0 on a vocabulary
    over `max_candidates`, or more than `max_candidates` relative-top blocks in a row). Two host reads (the block
    counts, the candidate counts); a few more (the row indices) when rows are left."""
    target = target_logits.float()
    rows, vocab = target.shape
    full = vocab - vocab % CANDIDATE_BLOCK  # the last partial block's columns (the tail) are always scanned
    block_max = target[:, :full].view(rows, -1, CANDIDATE_BLOCK).amax(dim=-1)  # [R, B]
    tail = target[:, full:]
    scanned_max = torch.cat([block_max, tail.amax(dim=-1, keepdim=True)], dim=1) if tail.shape[1] else block_max
    threshold = scanned_max.amax(dim=-1, keepdim=True) + log_filter[:, None].to(target.dtype)
    relative = scanned_max >= threshold  # each such block's maximum is a candidate
    needed = relative
    k = min(int(min_keep), vocab)
    if k > 1:
        kth_block = scanned_max.topk(min(k, scanned_max.shape[1]), dim=-1).values[:, -1:]
        needed = relative | (scanned_max >= kth_block)
    # every needed block is among a row's `width` largest block maxima; a filter of 0 keeps the whole vocabulary
    needed_blocks = needed[:, : block_max.shape[1]].sum(-1)
    counts = [needed_blocks, relative.sum(-1), (log_filter == float("-inf")).long()]
    width, at_least, unfiltered = torch.stack(counts).amax(-1).tolist()
    if at_least > max_candidates or (unfiltered and vocab > max_candidates):
        return None
    scan_rows = None  # the rows scanned here (None: all)
    if spread_blocks is not None and width > spread_blocks:
        spread = needed_blocks > spread_blocks
        scanned, width = torch.stack([(~spread).sum(), needed_blocks.masked_fill(spread, 0).amax()]).tolist()
        if not scanned:
            return CandidateSplit(None, None, None, torch.arange(rows, device=target.device))
        scan_rows = (~spread).nonzero()[:, 0]
        block_max, threshold = block_max[scan_rows], threshold[scan_rows]
    n = block_max.shape[0]
    chosen = block_max.topk(width, dim=-1).indices  # [n, width]
    offsets = torch.arange(CANDIDATE_BLOCK, device=target.device)
    columns = (chosen[:, :, None] * CANDIDATE_BLOCK + offsets).reshape(n, -1)
    if tail.shape[1]:
        columns = torch.cat([columns, torch.arange(full, vocab, device=target.device).expand(n, -1)], dim=1)
    values = target.gather(1, columns) if scan_rows is None else target[scan_rows[:, None], columns]
    keep = values >= threshold
    if k > 1:
        keep |= values >= values.topk(k, dim=-1).values[:, -1:]
    per_row = keep.sum(dim=-1)
    fits = per_row <= max_candidates
    m, all_fit = torch.stack([per_row.masked_fill(~fits, 0).amax(), fits.all()]).tolist()
    if all_fit and scan_rows is None:
        top = values.topk(m, dim=-1).indices
        return CandidateSplit(None, columns.gather(1, top), keep.gather(1, top), None)
    if m == 0:  # no row fits
        return CandidateSplit(None, None, None, torch.arange(rows, device=target.device))
    if not all_fit:
        values, columns, keep = values[fits], columns[fits], keep[fits]
    kept_rows = torch.zeros(rows, dtype=torch.bool, device=target.device)
    kept_rows[fits.nonzero()[:, 0] if scan_rows is None else scan_rows[fits]] = True
    top = values.topk(m, dim=-1).indices
    left = (~kept_rows).nonzero()[:, 0]
    return CandidateSplit(kept_rows.nonzero()[:, 0], columns.gather(1, top), keep.gather(1, top), left)


def assistant_penalty(
    assistant: torch.Tensor,
    keep: torch.Tensor,
    prefer: bool | torch.Tensor = DEFAULT_RULE == "prefer",
    margin: float | torch.Tensor = 0.0,
    early_exit: torch.Tensor | None = None,
    gate: bool | torch.Tensor = False,
    learnt: torch.Tensor | None = None,
) -> torch.Tensor:
    """What alpha multiplies, per [R, N] column: the assistant's logit (`difference`), or how far it lies more than
    `margin` above the assistant's median over the row's candidates `keep` (`prefer`: 0 for the candidates it does
    not prefer by more than the margin). `margin`: a float for every row or [R].

    `gate` (a bool for every row or [R]) with `early_exit` (the target's early-exit logits on the same columns): the
    penalty only where the assistant prefers a candidate by more than the early exit does (module docstring);
    `learnt`: that test already computed (`learnt_preference`), so a caller that also finishes words runs it once.

    Values outside `keep` are irrelevant (the caller masks them to -inf)."""
    a = assistant.float()
    if prefer is False:
        penalty = a
    else:
        penalty = _preferred(a, keep, margin)
        if prefer is not True:
            penalty = torch.where(prefer[:, None], penalty, a)
    if gate is False or early_exit is None:
        return penalty
    if learnt is None:
        learnt = learnt_preference(a, early_exit, keep, margin)
    if gate is not True:
        learnt = learnt | ~gate[:, None]  # not in place: the caller may share `learnt` with finishing words
    return penalty * learnt


def _preferred(a: torch.Tensor, keep: torch.Tensor, margin: float | torch.Tensor) -> torch.Tensor:
    """How far each column lies more than `margin` above the row's median over its candidates `keep` (else 0)."""
    if isinstance(margin, torch.Tensor):
        margin = margin.to(a.dtype)[:, None]
    centre = a.masked_fill(~keep, float("nan")).nanmedian(dim=-1, keepdim=True).values
    return (a - centre - margin).clamp_min(0).nan_to_num(0.0)  # a row without candidates: NaN centre


def _guarded(
    penalty: torch.Tensor,
    keep: torch.Tensor,
    guard: bool | torch.Tensor,
    prefixes: TokenPrefixes | None,
    token_ids: torch.Tensor | None,
) -> torch.Tensor:
    if guard is False:
        return penalty
    if prefixes is None:
        raise ValueError("the prefix guard needs the tokenizer's prefixes (token_prefixes.TokenPrefixes)")
    return close_over_prefixes(penalty, keep, prefixes, token_ids, guard)


def close_over_prefixes(
    penalty: torch.Tensor,
    keep: torch.Tensor,
    prefixes: TokenPrefixes,
    token_ids: torch.Tensor | None = None,
    guard: bool | torch.Tensor = True,
) -> torch.Tensor:
    """The prefix guard: every candidate whose text begins a penalised candidate's (token_prefixes.py) takes that
    penalty too (the largest, when it begins several), so that a remembered word pushed down is not spelt out by its
    first letters instead ("J.K.R." for "J.K. Rowling"). `token_ids` [R, N]: the columns' token ids (None: the whole
    vocabulary, where the PREFIX_GUARD_TOP most penalised candidates of each row pass theirs on). `guard`: a bool for
    every row or [R] (False rows unchanged). Tensor-only: no host read."""
    if guard is False:
        return penalty
    given = penalty.masked_fill(~keep, 0.0).clamp_min(0.0)
    rows = penalty.shape[0]
    if token_ids is not None:  # a few candidate columns: look every (c, d) pair up in the sorted keys
        keys = token_ids[:, :, None] * prefixes.vocab_size + token_ids[:, None, :]
        flat = keys.reshape(-1)
        found = torch.searchsorted(prefixes.pair_keys, flat).clamp_max(prefixes.pair_keys.numel() - 1)
        begins = (prefixes.pair_keys[found] == flat).view_as(keys)  # [R, c, d]: c's text begins d's
        inherited = (given[:, None, :] * begins).amax(-1)
    else:  # the whole vocabulary: the most penalised candidates pass theirs on through the prefix table
        values, ids = given.topk(min(PREFIX_GUARD_TOP, given.shape[-1]), dim=-1)
        columns = prefixes.table[ids].reshape(rows, -1)  # [R, top * L], padding = the dropped column V
        spread = values[:, :, None].expand(-1, -1, prefixes.table.shape[1]).reshape(rows, -1)
        inherited = torch.zeros(rows, prefixes.vocab_size + 1, dtype=given.dtype, device=given.device)
        inherited = inherited.scatter_reduce(1, columns, spread, "amax")[:, : penalty.shape[-1]]
    closed = torch.maximum(penalty, inherited * keep)
    if guard is not True:
        closed = torch.where(guard[:, None], closed, penalty)
    return closed


def finish_begun_words(
    penalty: torch.Tensor,
    prefixes: TokenPrefixes,
    previous_ids: torch.Tensor,
    token_ids: torch.Tensor | None = None,
    finish: bool | torch.Tensor = True,
    learnt: torch.Tensor | None = None,
) -> torch.Tensor:
    """`penalty` [R, N] with 0 for every candidate that continues a word the row's last token (`previous_ids` [R])
    ended inside of (module docstring), except where `learnt` [R, N] (the LoRA's own preference) is True. `token_ids`
    [R, N]: the columns' ids (None: the whole vocabulary). `finish`: a bool for every row or [R] (False rows
    unchanged). Tensor-only."""
    if finish is False:
        return penalty
    if prefixes.starts_in_word is None or prefixes.ends_in_word is None:
        raise ValueError("finish_words needs the tokens' word pieces (TokenPrefixes.from_tokenizer)")
    inside = prefixes.ends_in_word[previous_ids]
    if finish is not True:
        inside = inside & finish
    if token_ids is None:
        continues = prefixes.starts_in_word[None, : penalty.shape[-1]]
    else:
        continues = prefixes.starts_in_word[token_ids]
    exempt = inside[:, None] & continues
    if learnt is not None:
        exempt &= ~learnt
    return penalty.masked_fill(exempt, 0.0)


def learnt_preference(
    assistant: torch.Tensor, early_exit: torch.Tensor, keep: torch.Tensor, margin: float | torch.Tensor
) -> torch.Tensor:
    """[R, N] bool: the assistant prefers the candidate by more than `margin` over what its early exit (the same K
    layers without the LoRA) prefers: what the LoRA learnt (the gate's test)."""
    return _preferred(assistant.float() - early_exit.float(), keep, margin) > 0


def _finished(
    penalty: torch.Tensor,
    finish: bool | torch.Tensor,
    prefixes: TokenPrefixes | None,
    previous_ids: torch.Tensor | None,
    token_ids: torch.Tensor | None,
    learnt: torch.Tensor | None,
) -> torch.Tensor:
    if finish is False:
        return penalty
    if prefixes is None or previous_ids is None or learnt is None:
        raise ValueError("finish_words needs the tokenizer's prefixes, each row's previous token and the early exit")
    return finish_begun_words(penalty, prefixes, previous_ids, token_ids, finish, learnt)


def _learnt_once(
    assistant: torch.Tensor,
    early_exit: torch.Tensor | None,
    keep: torch.Tensor,
    margin: float | torch.Tensor,
    gate: bool | torch.Tensor,
    finish: bool | torch.Tensor,
) -> torch.Tensor | None:
    """`learnt_preference` when the gate or finishing words read it (one median per row for both), else None."""
    if early_exit is None or (gate is False and finish is False):
        return None
    return learnt_preference(assistant, early_exit, keep, margin)


def floor_combined(
    combined: torch.Tensor,
    target: torch.Tensor,
    penalty: torch.Tensor,
    keep: torch.Tensor,
    floor: float | torch.Tensor | None,
    prefer: bool | torch.Tensor,
) -> torch.Tensor:
    """[R, N] combined logits with every penalised candidate raised to at least `floor` target logits below the
    best candidate of its row that has no penalty (capped at its own target logit). `floor`: None / inf = off, a
    float for every row or [R] (inf = off for that row). Rows under `difference` are unchanged."""
    if floor is None or prefer is False:
        return combined
    target = target.float()
    best_free = target.masked_fill(~keep | (penalty > 0), float("-inf")).amax(dim=-1, keepdim=True)
    if isinstance(floor, torch.Tensor):
        floor = floor.to(target.dtype)
        if prefer is not True:
            floor = floor.masked_fill(~prefer, float("inf"))
        floor = floor[:, None]
    elif prefer is not True:
        floor = torch.full_like(best_free, floor).masked_fill(~prefer[:, None], float("inf"))
    # inf floor: the lower bound is -inf, the row unchanged
    return torch.maximum(combined, torch.minimum(best_free - floor, target))


def refilter_combined(
    combined: torch.Tensor,
    target: torch.Tensor,
    log_filter: torch.Tensor,
    refilter: bool | torch.Tensor = True,
) -> torch.Tensor:
    """[R, N] combined logits with the demoted and the implausible candidates set to -inf (module docstring).

    `target`: the target's logits on the same N columns. `refilter`: a bool for every row or a [R] bool (False
    rows unchanged). Rows with a filter of 0 (ln = -inf) are unchanged. The winner (argmax) always survives."""
    if refilter is False:
        return combined
    best = combined.max(dim=-1, keepdim=True)
    target = target.float()
    demoted = target > target.gather(-1, best.indices)
    lf = log_filter[:, None]
    drop = (combined < best.values + lf) | (demoted & (lf > float("-inf")))
    if refilter is not True:
        drop &= refilter[:, None]
    return combined.masked_fill(drop, float("-inf"))


class CombineOptionError(ValueError):
    """A combination option with a bad value; `key` names it (rule, refilter, margin, floor, gate, prefix_guard,
    finish_words)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class CombineOptions:
    """How one artifact (its manifest's `defaults`) or one request (an engine-level override) combines its assistant
    with the target. The defaults are what a manifest written before these options existed is served with."""

    rule: str = LEGACY_RULE
    refilter: bool = False
    margin: float = 0.0
    floor: float | None = None  # None: off
    gate: str | None = None  # None: off; "early_exit" (ULD_GATES)
    prefix_guard: bool = False  # `prefer` only: candidates that begin a penalised one's text share its penalty
    finish_words: bool = False  # `prefer` only: a word begun is finished without penalty (module docstring)

    def updated(self, values: Mapping[str, Any]) -> CombineOptions:
        """These options with those `values` names (rule, refilter, margin, floor, gate, prefix_guard, finish_words)
        replaced, each
        checked: a bad one raises CombineOptionError naming it. Other keys are ignored."""
        rule, refilter = values.get("rule", self.rule), values.get("refilter", self.refilter)
        margin, floor = values.get("margin", self.margin), values.get("floor", self.floor)
        # the gate reads the prefer rule's preference: switching to `difference` drops an inherited gate (naming one
        # with it is an error)
        gate = values.get("gate", self.gate if rule == "prefer" else None)
        prefix_guard = values.get("prefix_guard", self.prefix_guard)
        finish = values.get("finish_words", self.finish_words)
        if rule not in ULD_RULES:
            raise CombineOptionError("rule", f"must be one of: {', '.join(ULD_RULES)} (got {rule!r})")
        if not isinstance(refilter, bool):
            raise CombineOptionError("refilter", f"must be true or false (got {refilter!r})")
        if not is_margin(margin):
            raise CombineOptionError("margin", f"must be a number >= 0 (got {margin!r})")
        if not is_floor(floor):
            raise CombineOptionError("floor", f"must be a number >= 0 or null (got {floor!r})")
        if gate is not None and gate not in ULD_GATES:
            raise CombineOptionError("gate", f"must be one of: {', '.join(ULD_GATES)}, or null (got {gate!r})")
        if gate is not None and rule != "prefer":
            raise CombineOptionError("gate", f"needs the prefer rule (got rule {rule!r})")
        if not isinstance(prefix_guard, bool):
            raise CombineOptionError("prefix_guard", f"must be true or false (got {prefix_guard!r})")
        if not isinstance(finish, bool):
            raise CombineOptionError("finish_words", f"must be true or false (got {finish!r})")
        floor = None if floor is None else float(floor)
        return CombineOptions(rule, refilter, float(margin), floor, gate, prefix_guard, finish)

    def served_floor(self, filter_value: float) -> float | None:
        """The floor a row needs, or None where it cannot change the output: off, `difference`, or the refilter on
        with a floor above ln(1/filter), so every candidate the floor raises is removed anyway (`floor_combined`).
        That is the serving default, so the decode step skips the work."""
        if self.floor is None or self.rule != "prefer":
            return None
        if self.refilter and filter_value > 0 and self.floor > -math.log(filter_value):
            return None
        return self.floor


@dataclass(frozen=True)
class CombineSettings:
    """The combination options of R rows as the combine functions take them: one Python value when every row
    agrees (the usual case: no per-row select), else a per-row tensor. `prefer` stands for the rule
    (True = `prefer`); a floor of None or inf is off; `gate` True = gated by the early exit."""

    prefer: bool | torch.Tensor = DEFAULT_RULE == "prefer"
    refilter: bool | torch.Tensor = False
    margin: float | torch.Tensor = 0.0
    floor: float | torch.Tensor | None = None
    gate: bool | torch.Tensor = False
    prefix_guard: bool | torch.Tensor = False  # True = the prefix guard (`prefer` rows only)
    finish_words: bool | torch.Tensor = False  # True = words begun are finished without penalty (`prefer` rows only)

    @classmethod
    def of_rows(
        cls, rows: Sequence[CombineOptions], filters: Sequence[float], device: torch.device | str
    ) -> CombineSettings:
        """The settings of `rows` (with their filters, which decide where the floor is needed), built on the host."""

        def per_row(values: list, dtype: torch.dtype):
            return values[0] if len(set(values)) == 1 else torch.tensor(values, device=device, dtype=dtype)

        floors = [o.served_floor(f) for o, f in zip(rows, filters, strict=True)]
        return cls(
            per_row([o.rule == "prefer" for o in rows], torch.bool),
            per_row([o.refilter for o in rows], torch.bool),
            per_row([o.margin for o in rows], torch.float32),
            floors[0]
            if len(set(floors)) == 1
            else per_row([math.inf if f is None else f for f in floors], torch.float32),
            per_row([o.gate is not None for o in rows], torch.bool),
            per_row([o.prefix_guard and o.rule == "prefer" for o in rows], torch.bool),
            per_row([o.finish_words and o.rule == "prefer" for o in rows], torch.bool),
        )

    def rows(self, index: torch.Tensor) -> CombineSettings:
        """The settings of the rows `index` selects (per-row tensors indexed; shared values kept)."""

        def pick(value: Any) -> Any:
            return value.index_select(0, index) if isinstance(value, torch.Tensor) else value

        return CombineSettings(
            pick(self.prefer),
            pick(self.refilter),
            pick(self.margin),
            pick(self.floor),
            pick(self.gate),
            pick(self.prefix_guard),
            pick(self.finish_words),
        )

    @property
    def any_gate(self) -> bool:
        """Whether any row is gated (the step then needs the early exit's hidden states)."""
        return self.gate is not False

    def kwargs(self) -> dict[str, Any]:
        """As keyword arguments of `combine_logits` / `combine_on_candidates` (no copy of the tensors)."""
        return {
            "prefer": self.prefer,
            "refilter": self.refilter,
            "margin": self.margin,
            "floor": self.floor,
            "gate": self.gate,
            "prefix_guard": self.prefix_guard,
            "finish_words": self.finish_words,
        }

    @property
    def needs_early_exit(self) -> bool:
        """Whether the step needs the early exits: a gated row, or one that finishes words (both read what the LoRA
        learnt)."""
        return self.gate is not False or self.finish_words is not False

    @property
    def needs_previous_ids(self) -> bool:
        """Whether any row finishes words (the combination then needs each row's previous token)."""
        return self.finish_words is not False


def combine_logits(
    target_logits: torch.Tensor,
    assistant_logits: torch.Tensor,
    alpha: torch.Tensor,
    log_filter: torch.Tensor,
    min_keep: int = ULD_MIN_CANDIDATES,
    *,
    prefer: bool | torch.Tensor = DEFAULT_RULE == "prefer",
    refilter: bool | torch.Tensor = False,
    margin: float | torch.Tensor = 0.0,
    floor: float | torch.Tensor | None = None,
    gate: bool | torch.Tensor = False,
    early_exit_logits: torch.Tensor | None = None,
    prefix_guard: bool | torch.Tensor = False,
    prefixes: TokenPrefixes | None = None,
    finish_words: bool | torch.Tensor = False,
    previous_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """ULD's combination for [R, V] rows: target - alpha * penalty on the candidate set, -inf elsewhere.

    Implausible tokens get -inf, so subtracting the assistant never promotes them; with `refilter`, the
    candidates the subtraction demoted below the winner or pushed below max + ln(filter) get -inf too
    (`refilter_combined`). Gated rows (`gate`) need the target's `early_exit_logits` [R, V]; guarded rows
    (`prefix_guard`) the tokenizer's `prefixes`; rows that finish words (`finish_words`) the prefixes and each row's
    `previous_ids` [R] (the token the row's logits follow) and the `early_exit_logits`.
    """
    keep = plausible_mask(target_logits, log_filter, min_keep)
    learnt = _learnt_once(assistant_logits, early_exit_logits, keep, margin, gate, finish_words)
    penalty = assistant_penalty(assistant_logits, keep, prefer, margin, early_exit_logits, gate, learnt)
    penalty = _guarded(penalty, keep, prefix_guard, prefixes, None)
    penalty = _finished(penalty, finish_words, prefixes, previous_ids, None, learnt)
    combined = target_logits.float() - alpha[:, None] * penalty
    combined = floor_combined(combined, target_logits, penalty, keep, floor, prefer)
    return refilter_combined(combined.masked_fill(~keep, float("-inf")), target_logits, log_filter, refilter)


def combine_on_candidates(
    target_logits: torch.Tensor,
    candidates: torch.Tensor,
    assistant_candidate_logits: torch.Tensor,
    alpha: torch.Tensor,
    keep: torch.Tensor,
    **options: Any,
) -> torch.Tensor:
    """`combine_logits` when the assistant was scored only on `candidates` [R, M] (a superset of the [R, V] `keep`),
    as a new [R, V] tensor; `options`: `combine_candidate_values`'s (rule, refilter + log_filter, margin, floor).

    Everything outside the candidate set is -inf anyway, so the assistant's LM head is needed on
    those tokens only: M columns instead of V (SmolLM2: tens instead of 49,152).
    """
    target = target_logits.float()
    on_candidates = target.gather(-1, candidates)
    kept = keep.gather(-1, candidates)
    values = combine_candidate_values(
        on_candidates, assistant_candidate_logits, alpha, kept, token_ids=candidates, **options
    )
    return torch.full_like(target, float("-inf")).scatter_(-1, candidates, values)


def combine_candidate_values(
    target_candidate_logits: torch.Tensor,
    assistant_candidate_logits: torch.Tensor,
    alpha: torch.Tensor,
    kept: torch.Tensor,
    *,
    prefer: bool | torch.Tensor = DEFAULT_RULE == "prefer",
    refilter: bool | torch.Tensor = False,
    log_filter: torch.Tensor | None = None,
    margin: float | torch.Tensor = 0.0,
    floor: float | torch.Tensor | None = None,
    gate: bool | torch.Tensor = False,
    early_exit_logits: torch.Tensor | None = None,
    prefix_guard: bool | torch.Tensor = False,
    prefixes: TokenPrefixes | None = None,
    token_ids: torch.Tensor | None = None,
    finish_words: bool | torch.Tensor = False,
    previous_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The combined logits on [R, M] candidate columns only (`combine_on_candidates` without the scatter back to the
    vocabulary): target's and assistant's logits on them, `kept` [R, M] which of them are the row's candidates (the
    others end at -inf). `refilter` needs the rows' `log_filter` (the same as `plausible_mask`'s); gated rows need
    the early exit's logits on the same columns; guarded rows (`prefix_guard`) the `prefixes` and the columns'
    `token_ids` [R, M]; rows that finish words the prefixes, the `token_ids`, each row's `previous_ids` [R] and
    the early exit's logits."""
    on_candidates = target_candidate_logits.float()
    learnt = _learnt_once(assistant_candidate_logits, early_exit_logits, kept, margin, gate, finish_words)
    penalty = assistant_penalty(assistant_candidate_logits, kept, prefer, margin, early_exit_logits, gate, learnt)
    if (prefix_guard is not False or finish_words is not False) and token_ids is None:
        raise ValueError("the prefix guard and finish_words need the candidates' token ids")
    penalty = _guarded(penalty, kept, prefix_guard, prefixes, token_ids)
    penalty = _finished(penalty, finish_words, prefixes, previous_ids, token_ids, learnt)
    values = on_candidates - alpha[:, None] * penalty
    values = floor_combined(values, on_candidates, penalty, kept, floor, prefer)
    values = values.masked_fill(~kept, float("-inf"))
    if refilter is not False:
        if log_filter is None:
            raise ValueError("refilter needs the rows' log_filter")
        values = refilter_combined(values, on_candidates, log_filter, refilter)
    return values
