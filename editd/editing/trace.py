"""Scoped activation tracing: hooks that exist only inside a `with` block.

Modelled on rome's `util/nethook.py` (`Trace`, `TraceDict`, `StopForward`), with two changes
that a served model needs:

- Hooks act only for the thread that opened the block. The daemon computes an edit while the
  HTTP server keeps answering requests on other threads with the same modules; a hook that
  captured or changed their activations would corrupt both.
- Module outputs may be a tensor (transformers 5 decoder layers, every `nn.Linear`) or a tuple
  whose first element is the hidden state (older decoder layers). Captures and edits always see
  the hidden-state tensor; a tuple is rebuilt around the edited tensor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, ExitStack
from types import TracebackType
from typing import Any

import torch
from torch import nn

# edit(output_hidden, input_hidden) -> new output_hidden
EditFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised by a hook with `stop=True` to end the forward pass early; the `with` swallows it."""


def hidden_of(value: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output or input: the value itself or its first item."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot find a hidden-state tensor in a {type(value).__name__}")


def replace_hidden(value: Any, hidden: torch.Tensor) -> Any:
    """`value` with its hidden-state tensor replaced, keeping a tuple a tuple."""
    if isinstance(value, torch.Tensor):
        return hidden
    return type(value)((hidden, *value[1:]))


class Trace(AbstractContextManager["Trace"]):
    """Capture (and optionally edit) one module's input and/or output during forward passes.

    with Trace(model, "model.layers.3.mlp.down_proj", retain_input=True) as t:
        model(**batch)
    t.input   # (n, T, d_in), the last forward's input

    `edit_output(output, input) -> output` replaces the module's output hidden state, e.g. to
    add a residual delta at the subject position, or a weight update's effect `input @ Δᵀ`.
    Captured tensors are detached unless `detach=False` (needed when the capture feeds a
    loss). With `stop=True` the forward ends after the module.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        *,
        retain_input: bool = False,
        retain_output: bool = False,
        edit_output: EditFn | None = None,
        detach: bool = True,
        stop: bool = False,
    ) -> None:
        self.module = model.get_submodule(layer)
        self.layer = layer
        self.retain_input = retain_input
        self.retain_output = retain_output
        self.edit_output = edit_output
        self.detach = detach
        self.stop = stop
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._thread: int | None = None

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any):
        if threading.get_ident() != self._thread:
            return None
        inp = hidden_of(args[0] if args else next(iter(kwargs.values())))
        if self.retain_input:
            self.input = self._keep(inp)
        result = None
        if self.edit_output is not None:
            result = replace_hidden(out, self.edit_output(hidden_of(out), inp))
            out = result
        if self.retain_output:
            self.output = self._keep(hidden_of(out))
        if self.stop:
            raise StopForward
        return result

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() if self.detach else x

    def __enter__(self) -> Trace:
        self._thread = threading.get_ident()
        self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(dict[str, Trace], AbstractContextManager["TraceDict"]):
    """Several `Trace`s at once, keyed by module name.

    Hooks are registered in the given order and removed in reverse order on exit, also when
    the block raises. `edit_output` may be one function for all layers or a per-layer mapping.
    With `stop=True` the forward ends after the last listed layer (list them in forward order).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str],
        *,
        retain_input: bool = False,
        retain_output: bool = False,
        edit_output: EditFn | dict[str, EditFn] | None = None,
        detach: bool = True,
        stop: bool = False,
    ) -> None:
        super().__init__()
        self._model = model
        self._layers = list(dict.fromkeys(layers))
        self._kwargs = dict(retain_input=retain_input, retain_output=retain_output, detach=detach)
        self._edit = edit_output
        self._stop = stop
        self._stack: ExitStack | None = None

    def __enter__(self) -> TraceDict:
        stack = ExitStack()
        try:
            for i, name in enumerate(self._layers):
                edit = self._edit.get(name) if isinstance(self._edit, dict) else self._edit
                trace = Trace(
                    self._model,
                    name,
                    edit_output=edit,
                    stop=self._stop and i == len(self._layers) - 1,
                    **self._kwargs,  # type: ignore[arg-type]
                )
                self[name] = stack.enter_context(trace)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        # ExitStack unwinds in reverse registration order and runs every exit even if one fails.
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        return exc_type is not None and issubclass(exc_type, StopForward)
