"""Batching encoded features: pad ids, labels and attention masks to the longest row."""

from __future__ import annotations

from .encoding import IGNORE


class PaddingCollator:
    """Pad a batch to its longest member (never to max_length).

    Padding is masked by position: attention_mask 0 and label -100 on every padded slot, so a
    pad id equal to the EOS id never hides the labelled EOS. Seq2seq (`seq2seq=True`): labels
    are padded on their own, on the right; the model builds decoder inputs from them.
    """

    def __init__(
        self,
        pad_token_id: int,
        label_pad: int = IGNORE,
        pad_to_multiple_of: int | None = None,
        padding_side: str = "right",
        seq2seq: bool = False,
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.label_pad = label_pad
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side
        self.seq2seq = seq2seq

    def _width(self, rows: list[list[int]]) -> int:
        width = max(len(row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return width

    @staticmethod
    def _pad(rows: list[list[int]], width: int, value: int, side: str) -> list[list[int]]:
        if side == "left":
            return [[value] * (width - len(row)) + list(row) for row in rows]
        return [list(row) + [value] * (width - len(row)) for row in rows]

    def __call__(self, features: list[dict]) -> dict:
        import torch

        inputs = [f["input_ids"] for f in features]
        masks = [f.get("attention_mask") or [1] * len(f["input_ids"]) for f in features]
        width = self._width(inputs)
        batch = {
            "input_ids": self._pad(inputs, width, self.pad_token_id, self.padding_side),
            "attention_mask": self._pad(masks, width, 0, self.padding_side),
        }
        if "labels" in features[0]:
            labels = [f["labels"] for f in features]
            if self.seq2seq:
                batch["labels"] = self._pad(labels, self._width(labels), self.label_pad, "right")
            else:
                for row, ids in zip(labels, inputs):
                    if len(row) != len(ids):
                        raise ValueError("causal features need labels as long as input_ids")
                batch["labels"] = self._pad(labels, width, self.label_pad, self.padding_side)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
