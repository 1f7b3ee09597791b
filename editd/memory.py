"""What a version serves, in its two forms: plain weight deltas or a gated edit memory.

A leaf module beside `lowrank` (torch only): the editor produces the parts, the edit store
journals them and computes each version's fingerprint, the model handle installs them.

**Weights** (`form == "weights"`): every edited `down_proj` serves `cast(base + Σ Δ_v)`; every
token of every text sees every batch's update, and its small leak ‖Δ k‖ on keys that belong
to no fact is what wears a model down over thousands of sequential edits.

**Gated** (`form == "gated"`): the base weights stay untouched. Each version's batch is kept
as a block: its update factors per edited module (the same closed-form EMMET/MEMIT solve as
the weight form) and its facts' gate keys. At the gate module (the first edited layer), each
token's layer input `x` is embedded as `e(x) = normalise(x P)` with the version's projection
`P` (d_in × r: C0's leading eigen-directions, whitened, chosen by the editor); a block is
*open* at that token when some fact key `g` of the block has `e(x) · g ≥ τ`. Every edited
module then adds `Δ_b x` for each open block b at that token, and nothing elsewhere:

    out = W x + Σ_{b open at x} L_b (R_b x)

A block's update is exact for its facts' keys (EMMET's equality constraints hold jointly for
the batch), so a gate is decided per block, not per fact: opening a block applies the whole
batch's solve, which is what makes its write exact where it opens. A text that reads no edited
subject opens nothing, and its logits are those of the base model, bit for bit.

The gate is decided once per token, at the first edited layer, and reused by the later edited
layers of the same forward pass: their inputs at that token already carry the earlier writes,
so re-deciding there would let a write open or close its own gate.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

FORMS = ("weights", "gated")
PROJECTION = "_gate.projection"  # (d_in, r) in a version's update file and on the wire
GATE_KEYS = "_gate.facts"  # (b, r) normalised embeddings of the batch's keys
GATE_LIMITS = "_gate.thresholds"  # (b,) per-fact thresholds, where a gate has them


def embed(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Unit-length gate embeddings of layer inputs `x` (..., d_in) → (..., r), float32."""
    z = x.to(torch.float32) @ projection.to(device=x.device, dtype=torch.float32)
    return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def gate_projection(c0: torch.Tensor, rank: int) -> torch.Tensor:
    """P (d_in, r): C0's `rank` leading eigen-directions, each scaled by 1/√eigenvalue.

    Raw cosine between MLP inputs is dominated by the few directions every token shares
    (all keys look alike); whitening by the second moment of ordinary text makes those count
    as much as any other. The trailing directions, where the corpus has almost no energy,
    are left out: whitening would blow their noise up to the size of the signal.
    """
    c = c0.to(torch.float64)
    vals, vecs = torch.linalg.eigh(c)  # ascending
    r = min(rank, c.shape[0])
    top_vals = vals[-r:].clamp_min(vals[-1] * 1e-12)
    return (vecs[:, -r:] * top_vals.rsqrt()).to(torch.float32).contiguous()


@dataclass(frozen=True)
class Gate:
    """What a gated version adds to its update: where and how its block opens.

    module: the gate module (the first edited layer's down_proj); threshold τ; projection P
    (d_in, r); keys (b, r): the batch's keys at the gate module, embedded (`embed`).
    """

    module: str
    threshold: float
    projection: torch.Tensor
    keys: torch.Tensor
    # Per fact (b,), each ≥ `threshold`; None: every fact opens at `threshold`. A fact whose
    # key resembles ordinary text can be made to open only above what such text reaches.
    thresholds: torch.Tensor | None = None

    def fact_thresholds(self) -> torch.Tensor:
        """(b,) float32: the similarity at which each fact's key opens the block."""
        if self.thresholds is None:
            return torch.full((self.keys.shape[0],), float(self.threshold))
        return self.thresholds.to(torch.float32)

    def record(self) -> dict[str, object]:
        """What a manifest keeps of the gate beside its tensors."""
        return {
            "module": self.module,
            "threshold": float(self.threshold),
            "rank": int(self.projection.shape[1]),
        }


@dataclass(frozen=True)
class Block:
    """One version's batch as a gated memory serves it."""

    version: int
    layers: dict[
        str, tuple[torch.Tensor, torch.Tensor]
    ]  # name → (left (d_out, k), right (k, d_in))
    gate: Gate

    @functools.cached_property
    def digest(self) -> bytes:
        """sha256 of everything the block serves: its version, gate (module, τ, the
        projection's own digest, keys) and factors. Computed once per block object."""
        h = hashlib.sha256()
        h.update(struct.pack("<q", self.version))
        h.update(self.gate.module.encode())
        h.update(struct.pack("<d", float(self.gate.threshold)))
        h.update(projection_digest(self.gate.projection).encode())
        _hash_tensor(h, self.gate.keys)
        if self.gate.thresholds is not None:
            # Only then: a block without per-fact thresholds keeps the digest it always had.
            h.update(b"thresholds")
            _hash_tensor(h, self.gate.thresholds)
        for name in sorted(self.layers):
            left, right = self.layers[name]
            h.update(name.encode())
            _hash_tensor(h, left)
            _hash_tensor(h, right)
        return h.digest()


@dataclass(frozen=True)
class GatedMemory:
    """Every block of a version's lineage, oldest first: what a gated version serves."""

    blocks: tuple[Block, ...] = ()

    @property
    def facts(self) -> int:
        return sum(int(b.gate.keys.shape[0]) for b in self.blocks)

    def fingerprint(self) -> str:
        """sha256 over every block's factors, gate keys, projection and threshold, in order.

        What a gated version's manifest records beside the (unchanged) weights' sha256, and
        what a restore, a rollback and a replica check what they serve against.
        """
        # A chain over the blocks' digests: a block shared with the parent version (the store
        # keeps the same objects) is hashed once, so a commit hashes only its own block.
        chain = hashlib.sha256(b"editd-gated-memory/2").digest()
        for block in self.blocks:
            chain = hashlib.sha256(chain + block.digest).digest()
        return chain.hex()

    def bytes(self) -> int:
        """Bytes of tensors the memory holds (what it costs to keep, per process)."""
        total = 0
        seen: set[int] = set()
        for block in self.blocks:
            tensors = [block.gate.keys, *(t for pair in block.layers.values() for t in pair)]
            if id(block.gate.projection) not in seen:
                seen.add(id(block.gate.projection))
                tensors.append(block.gate.projection)
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total


MEMORY_SHA256 = "gated-memory"  # the manifest's sha256 entry for a gated version's memory


def projection_digest(projection: torch.Tensor) -> str:
    """sha256 hex of a projection's shape and bytes; names its file in an edit store."""
    h = hashlib.sha256()
    _hash_tensor(h, projection)
    return h.hexdigest()


def _hash_tensor(h: hashlib._Hash, t: torch.Tensor) -> None:
    flat = t.detach().to("cpu", torch.float32).contiguous().reshape(-1)
    h.update(struct.pack("<" + "q" * t.dim(), *t.shape))
    h.update(flat.view(torch.uint8).numpy().tobytes())


# -- serving ------------------------------------------------------------------------------------


@dataclass
class GateStats:
    """Tokens the gate saw and tokens where some block opened (a thread's or everyone's)."""

    tokens: int = 0
    fired: int = 0

    @property
    def rate(self) -> float:
        return self.fired / self.tokens if self.tokens else 0.0


@dataclass
class ServedMemory:
    """A `GatedMemory` laid out for the forward pass on one device.

    Blocks that share a projection are stacked so the gate is one product per projection:
    `keys[p]` (F_p, r) with `owner[p]` (F_p,) naming each key's block index.
    """

    memory: GatedMemory
    device: torch.device
    gate_module: str
    threshold: float
    projections: list[torch.Tensor] = field(default_factory=list)
    keys: list[torch.Tensor] = field(default_factory=list)
    limits: list[torch.Tensor] = field(default_factory=list)  # (F_p,) each key's threshold
    owner: list[torch.Tensor] = field(default_factory=list)
    layers: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    # block identity → the block and its factors laid out on the device, kept across swaps
    placed: dict[int, tuple[Block, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = field(
        default_factory=dict
    )

    @classmethod
    def build(
        cls, memory: GatedMemory, device: torch.device, reuse: ServedMemory | None = None
    ) -> ServedMemory:
        """Lay `memory` out on `device`; blocks `reuse` already placed are not copied again."""
        if not memory.blocks:
            raise ValueError("an empty gated memory serves nothing; serve the base instead")
        gates = {(b.gate.module, float(b.gate.threshold)) for b in memory.blocks}
        if len(gates) != 1:
            raise ValueError(f"one memory, one gate module and threshold; got {sorted(gates)}")
        module, threshold = gates.pop()
        served = cls(memory, device, module, threshold)
        before = reuse.placed if reuse is not None and reuse.device == device else {}
        for block in memory.blocks:
            kept = before.get(id(block))
            if kept is not None and kept[0] is block:
                served.placed[id(block)] = kept
            else:
                laid = {
                    n: (_place(lr[0], device), _place(lr[1], device))
                    for n, lr in block.layers.items()
                }
                served.placed[id(block)] = (block, laid)
        groups: dict[int, list[int]] = {}
        firsts: dict[int, torch.Tensor] = {}
        for i, block in enumerate(memory.blocks):
            p = block.gate.projection
            key = next(
                (
                    k
                    for k, q in firsts.items()
                    if q is p or (q.shape == p.shape and torch.equal(q, p))
                ),
                None,
            )
            if key is None:
                key = len(firsts)
                firsts[key] = p
            groups.setdefault(key, []).append(i)
        for key, members in groups.items():
            served.projections.append(_place(firsts[key], device))
            served.keys.append(
                _place(torch.cat([memory.blocks[i].gate.keys for i in members]), device)
            )
            served.limits.append(
                _place(
                    torch.cat([memory.blocks[i].gate.fact_thresholds() for i in members]), device
                )
            )
            served.owner.append(
                torch.cat(
                    [
                        torch.full((memory.blocks[i].gate.keys.shape[0],), i, dtype=torch.long)
                        for i in members
                    ]
                ).to(device)
            )
        empty = torch.zeros(0, device=device)
        for name in {n for b in memory.blocks for n in b.layers}:
            served.layers[name] = [
                served.placed[id(b)][1].get(name, (empty, empty)) for b in memory.blocks
            ]
        return served

    def open_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(N, B) bool: which blocks open at each of the N tokens of `x` (N, d_in)."""
        n_blocks = len(self.memory.blocks)
        out = torch.zeros(x.shape[0], n_blocks, dtype=torch.bool, device=x.device)
        groups = zip(self.projections, self.keys, self.limits, self.owner, strict=True)
        for proj, keys, limits, owner in groups:
            hits = (embed(x, proj) @ keys.T) >= limits  # (N, F_p)
            if not bool(hits.any()):
                continue
            tok, fact = hits.nonzero(as_tuple=True)
            out[tok, owner[fact]] = True
        return out

    def write(self, name: str, x: torch.Tensor, opened: torch.Tensor) -> torch.Tensor | None:
        """Σ over open blocks of L_b R_b x at module `name`, (N, d_out) float32, or None."""
        pairs = self.layers.get(name)
        if pairs is None or not bool(opened.any()):
            return None
        out: torch.Tensor | None = None
        tok, blk = opened.nonzero(as_tuple=True)
        for b in torch.unique(blk).tolist():
            left, right = pairs[b]
            if left.numel() == 0:
                continue
            rows = tok[blk == b]
            part = (x[rows].to(torch.float32) @ right.T) @ left.T  # (n_b, d_out)
            if out is None:
                out = torch.zeros(x.shape[0], left.shape[0], device=x.device, dtype=torch.float32)
            out.index_add_(0, rows, part)
        return out


def _place(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 copy on `device` with row-major strides: the same bits in, the same kernels
    and so the same bits out on every replica, whatever layout the tensor arrived in."""
    out = torch.empty(tuple(t.shape), dtype=torch.float32, device=device)
    out.copy_(t)
    return out


class GateCounter:
    """Tokens seen and fired, in total and per thread (the evaluator reads its own thread's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = GateStats()
        self._local = threading.local()
        # Told of every addition (tokens, fired): the daemon counts them into Prometheus as
        # they happen instead of reading this object at scrape time.
        self.listener: Callable[[int, int], None] | None = None

    def add(self, tokens: int, fired: int) -> None:
        with self._lock:
            self.total.tokens += tokens
            self.total.fired += fired
        if self.listener is not None:
            self.listener(tokens, fired)
        mine = self.mine()
        mine.tokens += tokens
        mine.fired += fired

    def mine(self) -> GateStats:
        stats = getattr(self._local, "stats", None)
        if stats is None:
            stats = self._local.stats = GateStats()
        return stats

    def snapshot(self) -> GateStats:
        with self._lock:
            return GateStats(self.total.tokens, self.total.fired)
