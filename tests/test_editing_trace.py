"""Scoped tracing: hooks exist only inside `with`, for the opening thread, on tensors and tuples."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from editd.editing.trace import Trace, TraceDict


class TupleBlock(nn.Module):
    """A decoder layer as older transformers wrote it: (hidden, attention weights)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.linear(x)
        return h, h.sum(-1)


class Net(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.block = TupleBlock(d)
        self.proj = nn.Linear(d, d)  # a plain tensor output
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.block(x)
        return self.head(torch.relu(self.proj(h)))


def _hooks(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in net.modules())


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


def test_captures_input_and_output_of_tensor_and_tuple_modules(net: Net) -> None:
    x = torch.randn(3, 8)
    with TraceDict(net, ["block", "proj"], retain_input=True, retain_output=True) as td:
        net(x)
    assert torch.equal(td["block"].input, x)
    h = net.block.linear(x)
    assert torch.allclose(td["block"].output, h)  # the hidden state of the tuple
    assert torch.allclose(td["proj"].input, h)
    assert torch.allclose(td["proj"].output, net.proj(h))
    assert _hooks(net) == 0


@pytest.mark.parametrize("layer", ["block", "proj"])
def test_edit_output_changes_the_forward_and_keeps_tuples(net: Net, layer: str) -> None:
    x = torch.randn(3, 8)
    base = net(x)
    seen = {}

    def edit(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        seen["inp"] = inp
        return out + 1.0

    with Trace(net, layer, edit_output=edit, retain_output=True) as tr:
        edited = net(x)
    assert not torch.allclose(edited, base)
    assert seen["inp"].shape == (3, 8)
    # The retained output is the edited one: what later layers saw.
    plain = net.block.linear(x) if layer == "block" else net.proj(net.block.linear(x))
    assert torch.allclose(tr.output, plain + 1.0)
    assert torch.allclose(net(x), base)  # gone after the block


def test_hooks_are_removed_when_the_block_raises(net: Net) -> None:
    with pytest.raises(RuntimeError, match="boom"), TraceDict(net, ["block", "proj", "head"]):
        net(torch.randn(2, 8))
        raise RuntimeError("boom")
    assert _hooks(net) == 0

    def bad_edit(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        raise ValueError("edit failed")

    with pytest.raises(ValueError, match="edit failed"), Trace(net, "proj", edit_output=bad_edit):
        net(torch.randn(2, 8))
    assert _hooks(net) == 0


def test_a_missing_layer_leaves_no_hooks_behind(net: Net) -> None:
    with pytest.raises(AttributeError), TraceDict(net, ["block", "nope"]):
        pass
    assert _hooks(net) == 0


def test_hooks_are_removed_in_reverse_order(net: Net) -> None:
    removed: list[str] = []
    with TraceDict(net, ["block", "proj", "head"]) as td:
        for name, trace in td.items():
            handle = trace._handle
            assert handle is not None
            original = handle.remove

            def remove(original=original, name=name) -> None:
                removed.append(name)
                original()

            handle.remove = remove  # type: ignore[method-assign]
    assert removed == ["head", "proj", "block"]


def test_stop_ends_the_forward_after_the_last_layer(net: Net) -> None:
    calls = []
    net.head.register_forward_hook(lambda *a: calls.append(1))
    with TraceDict(net, ["block", "proj"], retain_output=True, stop=True) as td:
        net(torch.randn(2, 8))
    assert td["proj"].output is not None and not calls


def test_other_threads_are_not_traced_or_edited(net: Net) -> None:
    x = torch.randn(3, 8)
    base = net(x)
    other: dict[str, torch.Tensor] = {}
    inside = threading.Event()
    done = threading.Event()

    def serve() -> None:
        inside.wait()
        other["out"] = net(x)  # a request answered while an edit is being computed
        done.set()

    worker = threading.Thread(target=serve)
    worker.start()
    with Trace(net, "proj", edit_output=lambda o, i: o * 0, retain_output=True) as tr:
        inside.set()
        done.wait(timeout=30)
        mine = net(x)
    worker.join()
    assert torch.allclose(other["out"], base)
    assert not torch.allclose(mine, base)
    assert torch.equal(tr.output, torch.zeros_like(tr.output))
