"""The output processor: sampled token ids in, text deltas out (detokenize, stop, emit).

Host-side work only, after a step's one copy of the sampled ids: it appends each token to its
sequence, decodes the new text incrementally, applies the stop rules (EOS, stop token ids, stop
strings, max_tokens, context length), frees the slots of finished sequences and builds one
`RequestOutput` per request touched by the step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from unlearn_serve.server.engine.sampler import gather_logprobs
from unlearn_serve.server.engine.scheduler import Scheduler
from unlearn_serve.server.engine.sequence import (
    LOGPROB_FLOOR,
    Request,
    RequestOutput,
    Sequence,
    SequenceOutput,
    TokenLogprob,
)

# Tokens of context (prompt, then earlier output) decoded before the newest token, as in vLLM.
DETOKENIZE_CONTEXT = 5


def finite_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax floored at LOGPROB_FLOOR: unlearned rows put -inf on implausible tokens, and JSON has no -inf."""
    return logits.log_softmax(dim=-1).nan_to_num(nan=LOGPROB_FLOOR).clamp_min(LOGPROB_FLOOR)


def logprob_entries(
    tokens: list[int], chosen: torch.Tensor, top_v: torch.Tensor | None, top_i: torch.Tensor | None, tops: list[int]
) -> list[TokenLogprob]:
    """Host `TokenLogprob`s from the (already gathered) device tensors of `gather_logprobs`."""
    chosen_l = chosen.tolist()
    top_v_l = top_v.tolist() if top_v is not None else None
    top_i_l = top_i.tolist() if top_i is not None else None
    out = []
    for j, token in enumerate(tokens):
        top = list(zip(top_i_l[j][: tops[j]], top_v_l[j][: tops[j]], strict=True)) if top_v_l else []
        out.append(TokenLogprob(token, chosen_l[j], top))
    return out


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int) -> list[TokenLogprob | None]:
    """Entry i > 0 is log p(prompt[i] | prompt[:i]); entry 0 has no context (None)."""
    if len(prompt) < 2:
        return [None]
    targets = torch.tensor(prompt[1:], device=logits.device)
    chosen, top_v, top_i = gather_logprobs(finite_logprobs(logits[:-1]), targets, k)
    return [None, *logprob_entries(prompt[1:], chosen, top_v, top_i, [k] * (len(prompt) - 1))]


class OutputProcessor:
    def __init__(
        self,
        tokenizer,
        eos_token_ids: set[int],
        max_model_len: int,
        scheduler: Scheduler,
        requests: dict[str, Request],
        on_finished: Callable[[Request], None],
    ):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.scheduler = scheduler
        self.requests = requests
        self.on_finished = on_finished  # unpins the request's artifact
        self.outputs: list[RequestOutput] = []

    def take(self) -> list[RequestOutput]:
        """The outputs built since the last call."""
        outputs, self.outputs = self.outputs, []
        return outputs

    # ------------------------------------------------------------------ per token
    def append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        request = seq.request
        params = request.params
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        seq.output_ids.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        if not params.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif token in params.stop_token_ids:
            seq.finish_reason = "stop"
            seq.stop_reason = token
        self._detokenize(seq)
        if seq.finish_reason is None and params.stop:
            self._check_stop_strings(seq)
        if seq.finish_reason is None and (
            len(seq.output_ids) >= params.max_tokens or seq.total_len >= self.max_model_len
        ):
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.scheduler.release(seq)

    def _decode_text(self, ids: list[int], skip: bool) -> str:
        # no clean-up: it rewrites text across token boundaries, so a prefix's text would not stay a prefix
        return self.tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)

    def _detokenize(self, seq: Sequence) -> None:
        """Append the text of the newest token (after vLLM's detokenize_incrementally).

        The tokens are decoded in a window that starts a few tokens back, in the prompt at first, so a
        SentencePiece "▁" that begins the window is what gets stripped, never the new token's: " Paris",
        not "Paris". The window's text is kept, so a token costs one decode (plus one every
        DETOKENIZE_CONTEXT tokens when the window slides).
        """
        skip = seq.request.params.skip_special_tokens
        ids = seq.detok_ids
        if not ids:  # first token: the window starts in the prompt
            ids.extend(seq.request.prompt_token_ids[-DETOKENIZE_CONTEXT:])
            seq.prefix_offset, seq.read_offset = 0, len(ids)
            seq.read_text = self._decode_text(ids, skip)
        ids.append(seq.output_ids[-1])
        full = self._decode_text(ids[seq.prefix_offset :], skip)
        # Hold back incomplete UTF-8 sequences (byte-level BPE splits characters across tokens).
        if len(full) <= len(seq.read_text) or (full.endswith("\ufffd") and seq.finish_reason is None):
            return
        seq.text += full[len(seq.read_text) :]
        seq.read_offset = len(ids)
        seq.read_text = full
        if seq.read_offset - seq.prefix_offset > 2 * DETOKENIZE_CONTEXT:  # keep the window short
            seq.prefix_offset = seq.read_offset - DETOKENIZE_CONTEXT
            seq.read_text = self._decode_text(ids[seq.prefix_offset :], skip)

    def _check_stop_strings(self, seq: Sequence) -> None:
        params = seq.request.params
        longest = max(len(s) for s in params.stop)
        start = max(0, seq.sent_text_len - longest)
        best = None
        for stop in params.stop:
            idx = seq.text.find(stop, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is not None:
            idx, stop = best
            seq.text = seq.text[: idx + len(stop)] if params.include_stop_str_in_output else seq.text[:idx]
            seq.finish_reason = "stop"
            seq.stop_reason = stop

    # ------------------------------------------------------------------ per request
    def emit_many(self, seqs: list[Sequence]) -> None:
        by_request: dict[str, tuple[Request, list[Sequence]]] = {}
        for seq in seqs:
            by_request.setdefault(seq.request.request_id, (seq.request, []))[1].append(seq)
        for request, group in by_request.values():
            self.emit(request, group)

    def emit(self, request: Request, seqs: list[Sequence], error: str | None = None) -> None:
        outputs = []
        for seq in seqs:
            params = request.params
            send_upto = len(seq.text)
            if seq.finish_reason is None and params.stop:
                # a stop string may be forming at the end: hold its possible prefix back
                send_upto = max(seq.sent_text_len, len(seq.text) - (max(len(s) for s in params.stop) - 1))
            text = seq.text[seq.sent_text_len : send_upto]
            seq.sent_text_len = send_upto
            tokens = seq.output_ids[seq.sent_token_len :]
            seq.sent_token_len = len(seq.output_ids)
            logprobs = None
            if params.logprobs is not None:
                logprobs, seq.pending_logprobs = seq.pending_logprobs, []
            outputs.append(SequenceOutput(seq.index, text, tokens, logprobs, seq.finish_reason, seq.stop_reason))
        prompt_lp = None
        if request.prompt_logprobs is not None and not request.prompt_logprobs_sent:
            prompt_lp = request.prompt_logprobs
            request.prompt_logprobs_sent = True
        finished = request.finished
        out = RequestOutput(
            request_id=request.request_id,
            outputs=outputs,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=prompt_lp,
            finished=finished,
            num_generated_tokens=request.num_generated_tokens,
            error=error,
        )
        if finished:
            request.finished_time = time.monotonic()
            self.requests.pop(request.request_id, None)
            self.on_finished(request)
        self.outputs.append(out)
        if request.on_output is not None:
            request.on_output(out)
