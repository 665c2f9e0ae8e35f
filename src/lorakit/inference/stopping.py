"""When a row of a batch is finished: a stop string in its new text, or its caller gone."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import StoppingCriteria

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedTokenizerBase


class StopOnStrings(StoppingCriteria):
    """Marks a row finished once its newly generated text contains one of the stop strings.

    Only the tail of each row's generated tokens is decoded (enough tokens to spell the longest
    stop string), so the cost per step stays small whatever the length generated so far.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str], prompt_width: int):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.prompt_width = prompt_width
        self.stopped_at: dict[int, int] = {}  # row -> generated length when its stop string appeared
        # a token spells at least one byte, so this many tokens always cover the longest string
        self.window = max((len(s.encode("utf-8")) for s in self.stop_strings), default=0) + 1

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.Tensor:
        generated = input_ids[:, self.prompt_width :]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stop_strings or generated.shape[1] == 0:
            return done
        for row, tokens in enumerate(generated.tolist()):
            done[row] = row in self.stopped_at or self.row_stops(row, tokens)
        return done

    def row_stops(self, row: int, tokens: Sequence[int]) -> bool:
        """Whether a stop string is in the tail of this row's new tokens (and when, in stopped_at)."""
        if not self.stop_strings:
            return False
        tail = self.tokenizer.decode(list(tokens[-self.window :]), skip_special_tokens=False)
        if any(s in tail for s in self.stop_strings):
            self.stopped_at[row] = len(tokens)
            return True
        return False


class _Cancelled(StoppingCriteria):
    """Ends a streamed generation when its reader has gone away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _RowsCancelled(StoppingCriteria):
    """Ends the rows whose caller has gone: cancelled(prompt index) is asked between decoding steps."""

    def __init__(self, cancelled: Callable[[int], bool], indices: Sequence[int]):
        self.cancelled = cancelled
        self.indices = list(indices)  # batch row -> index in the caller's prompt list

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([bool(self.cancelled(i)) for i in self.indices], dtype=torch.bool, device=input_ids.device)
