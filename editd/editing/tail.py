"""Replaying the decoder from a cached layer output: the forward pass after the edit layer.

Target optimisation adds δ after one decoder layer and runs the model again at every step, but
nothing before that layer depends on δ. `DecoderTail.record` traces one ordinary forward pass,
keeps the output of the edit layer and the arguments the model passed each later layer
(attention mask, rotary embeddings, positions: whatever this model and transformers version
build), and replays only those layers and the final norm on the cached output. On the built-in
model, edited after its last layer, a step then costs the final norm and nothing else.

The replay is checked against the full forward pass it was recorded from before it is used
(`matches`); a model laid out differently, or one whose later layers need arguments that cannot
be sliced by row, is run in full instead.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from editd.editing.trace import hidden_of


@dataclass
class DecoderTail:
    """Decoder layers after the edit layer and the final norm, with their recorded arguments.

    `hidden` is the edit layer's output (n, T, d) from the recorded pass; `calls[i]` the keyword
    arguments layer i of the tail received in it.
    """

    layers: Sequence[nn.Module]
    norm: nn.Module
    hidden: torch.Tensor | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(
        cls, model: nn.Module, layer_names: Sequence[str], edit_layer: str
    ) -> DecoderTail | None:
        """The tail after `edit_layer` among the decoder's `layer_names`; None if the model has
        no final norm where Llama-family decoders keep it (`get_decoder().norm`)."""
        norm = getattr(model.get_decoder(), "norm", None)
        if edit_layer not in layer_names or not isinstance(norm, nn.Module):
            return None
        later = layer_names[list(layer_names).index(edit_layer) + 1 :]
        return cls([model.get_submodule(n) for n in later], norm)

    @contextmanager
    def record(self, model: nn.Module, edit_layer: str) -> Iterator[DecoderTail]:
        """Hooks (this thread only, removed on exit) that keep what one forward pass shows."""
        thread = threading.get_ident()
        self.calls = [{} for _ in self.layers]

        def keep_hidden(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if threading.get_ident() == thread:
                self.hidden = hidden_of(out).detach()

        def keep_call(i: int):
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if threading.get_ident() == thread:
                    self.calls[i] = dict(kwargs)

            return hook

        handles = [model.get_submodule(edit_layer).register_forward_hook(keep_hidden)]
        try:
            for i, layer in enumerate(self.layers):
                handles.append(layer.register_forward_pre_hook(keep_call(i), with_kwargs=True))
            yield self
        finally:
            for h in reversed(handles):
                h.remove()

    def __call__(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's final (normed) hidden states from the edit layer's output `hidden`.

        `rows` selects rows of the recorded batch that `hidden` holds (all when None).
        """
        n = self.hidden.shape[0] if self.hidden is not None else hidden.shape[0]
        for layer, kwargs in zip(self.layers, self.calls, strict=True):
            picked = {k: _rows_of(v, rows, n) for k, v in kwargs.items()}
            hidden = hidden_of(layer(hidden, **picked))
        return self.norm(hidden)

    def sliceable(self) -> bool:
        """Whether every recorded argument can be cut to a subset of rows."""
        n = self.hidden.shape[0] if self.hidden is not None else 0
        try:
            for kwargs in self.calls:
                for v in kwargs.values():
                    _rows_of(v, torch.arange(1), n)
        except TypeError:
            return False
        return True

    def matches(self, full: torch.Tensor, mask: torch.Tensor) -> bool:
        """Whether replaying the recorded pass gives its final hidden states `full` (n, T, d)
        at the real tokens (`mask`), to float32 rounding."""
        if self.hidden is None or len(self.calls) != len(self.layers) or not self.sliceable():
            return False
        tol = 1e-4 if full.dtype == torch.float32 else 1e-2
        atol = tol * float(full.abs().max().clamp(min=1))
        # All rows, and every other row: selecting rows must cut every argument consistently.
        for rows in (None, torch.arange(0, full.shape[0], 2, device=full.device)):
            with torch.no_grad():
                got = self(self.hidden if rows is None else self.hidden[rows], rows=rows)
            want, keep = (full, mask) if rows is None else (full[rows], mask[rows])
            keep = keep.bool()
            if not torch.allclose(got[keep].float(), want[keep].float(), rtol=tol, atol=atol):
                return False
        return True


def _rows_of(value: Any, rows: torch.Tensor | None, n: int) -> Any:
    """`value` cut to `rows` along its batch dimension; per-batch values are left whole."""
    if rows is None or value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() and value.shape[0] == n and n > 1 else value
    if isinstance(value, tuple | list):
        return type(value)(_rows_of(v, rows, n) for v in value)
    raise TypeError(f"cannot select rows of a {type(value).__name__}")
