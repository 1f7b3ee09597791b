"""The served model: loading, geometry, the inference/update lock, and applying weight deltas.

`ModelHandle` is the one place that writes model weights. An edit's deltas are applied as
`weight = cast(base.float() + delta)`, where `base` is a copy of the tensor taken before its
first edit and `delta` is the float32 sum of every applied batch's update: the served weights of
a version depend only on that version's accumulated delta, so rolling back to a version gives
bit-identical tensors (docs/design.md, "Versions and exact rollback").
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from editd.editing.trace import TraceDict
from editd.lowrank import served_weight, tensor_sha256
from editd.memory import GateCounter, GatedMemory, ServedMemory

log = logging.getLogger(__name__)

DEFAULT_MODULE_TEMPLATE = "model.layers.{}.mlp.down_proj"
DEFAULT_LAYER_TEMPLATE = "model.layers.{}"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers so swaps are not starved.

    Not re-entrant: a thread holding the read side must not take it again while a writer may be
    waiting, or it deadlocks.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, config: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cpu":
        # Half-precision matmuls on CPU are slow and gain nothing here.
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = _DTYPES.get(stored)
    if stored in (torch.bfloat16, torch.float16):
        return stored
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_layers(num_layers: int) -> list[int]:
    """Edited layers from the model's depth: the early-middle MLPs.

    MEMIT edits layers 4–8 of 32-layer Llamas (and 3–8 of GPT-J's 28); that is 1/8 to 1/4 of
    the depth. Shallow models need the first layer left alone (it mostly builds token identity)
    and at least two later layers to carry the subject to the output, so they get layers 1 to
    about depth/2 − 1.
    """
    if num_layers < 4:
        return list(range(num_layers))
    if num_layers < 16:
        return list(range(1, max(2, num_layers // 2)))
    return list(range(round(num_layers / 8), round(num_layers / 4) + 1))


def model_identity(path: Path) -> str:
    """A cheap fingerprint of a checkpoint directory: its config and its weight files' headers.

    Hashing every weight byte of an 8B model takes minutes; the safetensors header (tensor
    names, shapes, offsets) plus the size and the first and last MiB of each file change with
    any retraining, and the config covers geometry.
    """
    h = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        h.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
    for f in sorted(path.iterdir()):
        if f.suffix not in {".safetensors", ".bin", ".pt"}:
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


@dataclass
class ModelHandle:
    """A causal LM with its tokenizer, geometry, lock and weight-delta bookkeeping.

    Use `with handle.reading():` around inference and `with handle.writing():` (taken by
    `set_deltas` itself) around weight swaps, so a request sees all of a batch or none.
    Module names (`model.layers.3.mlp.down_proj`) identify edited weights everywhere.
    """

    model: nn.Module
    tokenizer: Any
    module_template: str = DEFAULT_MODULE_TEMPLATE
    layer_template: str = DEFAULT_LAYER_TEMPLATE
    identity: str = "unnamed"
    path: Path | None = None  # the directory it was loaded from
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    _lock: ReadWriteLock = field(default_factory=ReadWriteLock, repr=False)
    _edited: set[str] = field(default_factory=set, repr=False)
    # The gated memory served now (editd.memory), its hooks, and the gate decision of the
    # forward pass a thread is in (made at the gate module, read by the later edited ones).
    _memory: ServedMemory | None = field(default=None, repr=False)
    _memory_hooks: dict[str, Any] = field(default_factory=dict, repr=False)
    _gate_local: threading.local = field(default_factory=threading.local, repr=False)
    gate_counter: GateCounter = field(default_factory=GateCounter, repr=False)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        *,
        module_template: str = DEFAULT_MODULE_TEMPLATE,
        layer_template: str = DEFAULT_LAYER_TEMPLATE,
    ) -> ModelHandle:
        """Load a local Hugging Face causal-LM directory (no network access is attempted)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, config)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, local_files_only=True)
        model.to(dev).eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        log.info("loaded %s on %s as %s", path, dev, dt)
        return cls(
            model=model,
            tokenizer=tokenizer,
            module_template=module_template,
            layer_template=layer_template,
            identity=model_identity(path),
            path=path,
        )

    def __post_init__(self) -> None:
        # A served model is never trained: no parameter needs a gradient, and autograd then
        # only tracks the edit's own variables.
        self.model.eval().requires_grad_(False)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def default_layers(self) -> list[int]:
        return default_layers(self.num_layers)

    def module_name(self, layer: int) -> str:
        return self.module_template.format(layer)

    def layer_name(self, layer: int) -> str:
        return self.layer_template.format(layer)

    def layer_names(self) -> list[str]:
        """Every decoder layer's name, in forward order."""
        return [self.layer_name(i) for i in range(self.num_layers)]

    def mlp_output_norm(self, layer: int) -> str | None:
        """The module that normalises layer `layer`'s MLP output before the residual add, if any.

        Gemma-2/3 and OLMo-2 style blocks apply an RMSNorm to the MLP's output
        (`post_feedforward_layernorm`); Llama adds `down_proj`'s output as it is, which is
        what the closed-form update assumes. Found from the block's own modules, not the
        model's name.
        """
        block = self.model.get_submodule(self.layer_name(layer))
        for child, module in block.named_children():
            name = child.lower()
            after_mlp = any(k in name for k in ("feedforward", "mlp", "ffn", "ffw"))
            if "post" in name and after_mlp and not list(module.children()):
                return f"{self.layer_name(layer)}.{child}"
        return None

    def weight(self, name: str) -> torch.Tensor:
        """The weight of module `name` (a trailing `.weight` is accepted too)."""
        name = name.removesuffix(".weight")
        return self.model.get_submodule(name).weight

    def reading(self):  # -> contextmanager
        return self._lock.reading()

    def writing(self):  # -> contextmanager
        return self._lock.writing()

    def set_deltas(
        self,
        deltas: Mapping[str, torch.Tensor],
        then: Callable[[], None] | None = None,
    ) -> float:
        """Serve `cast(base + delta)` for each named weight and no gated memory (`serve`)."""
        return self.serve(deltas, None, then)

    def serve(
        self,
        deltas: Mapping[str, torch.Tensor],
        memory: GatedMemory | None,
        then: Callable[[], None] | None = None,
    ) -> float:
        """Serve `cast(base + delta)` for each named weight, and `memory` through its gates,
        atomically for readers.

        `deltas` holds the accumulated update of every edited weight (not an increment). Names
        edited before but absent here go back to their base values. Accumulation is float32
        whatever the model's dtype. `memory` (editd.memory) adds each open block's write to
        its modules' outputs; None or an empty memory serves none. The new weights and the
        memory's device tensors are built before the write lock is taken, so readers wait
        only for the copies; `then` runs under the same lock, so state that must change
        together with what is served (the served version number) does.
        Returns the seconds the write lock was held (the swap pause requests may see).
        """
        with torch.no_grad():
            staged = {name: self._served(name, delta) for name, delta in deltas.items()}
            gated = (
                ServedMemory.build(memory, self.device, self._memory)
                if memory and memory.blocks
                else None
            )
        with self.writing():
            start = time.perf_counter()
            with torch.no_grad():
                for name, new in staged.items():
                    self.weight(name).copy_(new)
                for name in self._edited - set(staged):
                    self.weight(name).copy_(self.base[name])
            self._edited = set(staged)
            if gated is not None:
                self._hook_memory(gated)
            self._memory = gated
            if then is not None:
                then()
            return time.perf_counter() - start

    def memory_sha256(self) -> str | None:
        """The fingerprint of the gated memory served now (GatedMemory.fingerprint), if any."""
        with self.reading():
            return self._memory.memory.fingerprint() if self._memory is not None else None

    @property
    def memory(self) -> GatedMemory | None:
        served = self._memory
        return served.memory if served is not None else None

    def _hook_memory(self, served: ServedMemory) -> None:
        """Hooks on the modules a gated memory writes to, once each, ahead of any other.

        They stay registered for the handle's life and do nothing while no memory is served.
        Prepended, so a trace that replaces a module's output (base_view) replaces the write
        too, and a trace that reads an output sees it.
        """
        names = {served.gate_module, *served.layers}
        if "" not in self._memory_hooks:
            # A new forward pass of the whole model forgets the previous pass's gate.
            self._memory_hooks[""] = self.model.register_forward_pre_hook(
                lambda _m, _a: self._forget_gate(), prepend=True
            )
        for name in sorted(names - set(self._memory_hooks)):
            module = self.model.get_submodule(name)
            self._memory_hooks[name] = module.register_forward_hook(
                functools.partial(self._memory_hook, name), prepend=True
            )

    def _forget_gate(self) -> None:
        self._gate_local.opened = None

    def _memory_hook(
        self, name: str, _module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
    ) -> torch.Tensor | None:
        served = self._memory
        if served is None or not args:
            return None
        x = args[0]
        flat = x.reshape(-1, x.shape[-1])
        if name == served.gate_module:
            with torch.no_grad():
                opened = served.open_blocks(flat)
            self._gate_local.opened = opened
            self.gate_counter.add(flat.shape[0], int(opened.any(dim=1).sum()))
        else:
            opened = getattr(self._gate_local, "opened", None)
            if opened is None or opened.shape[0] != flat.shape[0]:
                # A pass that did not start at the gate module (a replay of later layers):
                # no gate was decided for these tokens, so nothing opens.
                return None
        if name not in served.layers:
            return None
        extra = served.write(name, flat, opened)
        if extra is None:
            return None
        return output + extra.reshape(*output.shape[:-1], extra.shape[-1]).to(output.dtype)

    def _served(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        w = self.weight(name)
        if delta.shape != w.shape:
            raise ValueError(
                f"delta for {name} has shape {tuple(delta.shape)}, weight has {tuple(w.shape)}"
            )
        return served_weight(self._base_of(name), delta.to(device=w.device, dtype=torch.float32))

    def _base_of(self, name: str) -> torch.Tensor:
        if name not in self.base:
            self.base[name] = self.weight(name).detach().clone()
        return self.base[name]

    def reset(self) -> None:
        """Serve the base model again."""
        self.serve({}, None)

    def base_view(self, names: Iterable[str] | None = None) -> TraceDict:
        """Within this block, this thread's forward passes see the base model.

        Each module the handle keeps a base copy of (every module it ever edited, or those of
        `names`) computes its output from that copy; other threads keep seeing the served
        weights. C0 and the base model's scores need the unedited model while an edited
        version is being served. Exact for the Llama family's bias-free `down_proj`.
        """
        chosen = [n for n in (names if names is not None else self.base) if n in self.base]
        edits = {n: functools.partial(_base_output, weight=self.base[n]) for n in chosen}
        return TraceDict(self.model, chosen, edit_output=edits)

    def weight_sha256(self, names: Iterable[str]) -> dict[str, str]:
        with self.reading():
            return {n: tensor_sha256(self.weight(n)) for n in names}


def _base_output(
    output: torch.Tensor, inputs: torch.Tensor, *, weight: torch.Tensor
) -> torch.Tensor:
    return torch.nn.functional.linear(inputs, weight)
