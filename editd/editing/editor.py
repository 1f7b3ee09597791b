"""The edit pipeline: facts → keys, targets, residuals → per-layer low-rank updates.

One pipeline for every method (MEMIT's): optimise a residual change δ after the last edited
layer (targets.py), then for each edited layer in order read its keys and the residual still
missing with the earlier layers' updates applied on the fly, give that layer its share, and
solve (solvers.py). The share is MEMIT's R / (layers left) with `split="even"`; by default
(`"joint"`) it is what a single EMMET over the remaining layers' stacked keys would have this
layer write (`solvers.layer_share`), so layers with more specific keys carry more. Methods
differ only in the solver and the preservation matrix.

A gated batch (`memory: gated`) is solved against its writes as the memory will serve them,
only at tokens where its gate opens (`keys.update_hooks`). `refine_rounds` adds passes for the
facts whose new object is still not the greedy answer once the update acts: their targets are
optimised again with the update in, and a correction is solved on top with the batch's other
facts held where they are.

The `Editor` owns the C0 cache and each layer's `Preservation`. Computing an update reads the
model; applying it is `editd.versions.VersionedModel.apply`'s job (durable commit, then the
swap under the write lock), which then calls `preserve` so the editor keeps the batch's keys.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from editd import config
from editd.editing.errors import NonFiniteUpdate, UneditableModel, UnrealisedUpdate
from editd.editing.gate import calibrated_thresholds, text_embeddings
from editd.editing.keys import (
    DEFAULT_PREFIXES,
    PromptSet,
    prompt_set,
    read_after_subject,
    read_anchors,
    read_at_subject,
    update_hooks,
)
from editd.editing.model import ModelHandle
from editd.editing.solvers import (
    SOLVE_DTYPE,
    SOLVERS,
    Preservation,
    layer_share,
    solve_emmet,
)
from editd.editing.stats import Corpus, SecondMomentCache, default_budget
from editd.editing.subject import SITES
from editd.editing.targets import TargetConfig, compute_targets, object_probability
from editd.editing.trace import TraceDict
from editd.facts import FactUpdate
from editd.lowrank import EditUpdate, LayerUpdate
from editd.memory import FORMS, Gate, embed, gate_projection

log = logging.getLogger(__name__)


SPLITS = config.SPLITS


# The engine's defaults for what the settings name are written once, in `editd.config`.
_SETTINGS = config.EditingSettings()


@dataclass(frozen=True)
class EditorConfig:
    """How the editor edits; `from_settings` builds it from the merged `editing` section."""

    algo: str = _SETTINGS.algo
    # "weights": updates add to the weights; "gated": each batch is a block of a gated memory
    # (editd.memory), opened where a layer-input matches one of its facts' keys.
    memory: str = _SETTINGS.memory
    gate_threshold: float = _SETTINGS.gate_threshold
    gate_rank: int | None = _SETTINGS.gate_rank  # None: d_in, the whole whitening
    # Per-fact thresholds above what the C0 text reaches + this margin; None: gate_threshold.
    gate_margin: float | None = _SETTINGS.gate_margin
    # Tokens of calibration text the thresholds are set on; None: C0's budget.
    gate_calibration_tokens: int | None = _SETTINGS.gate_calibration_tokens
    # Extra passes for the facts not greedy top-1 once the update acts (compute_update).
    refine_rounds: int = _SETTINGS.refine_rounds
    layers: tuple[int, ...] | None = None  # None: ModelHandle.default_layers()
    site: str = _SETTINGS.site  # where keys are read and δ is added (subject.render)
    # How the residual is split over layers: "joint" (solvers.layer_share) or MEMIT's "even".
    # On the built-in model (1,024 wide), 1,000 edits in batches of 100 kept canary 0.236 vs
    # 0.199 and ES 0.827 vs 0.812 with joint shares.
    split: str = _SETTINGS.layer_split
    mom2_weight: float = _SETTINGS.mom2_weight  # λ of λC0 (MEMIT, EMMET)
    emmet_eps: float = _SETTINGS.emmet_eps
    norm_weight: float = _SETTINGS.norm_weight  # ρ of ENCORE's norm constraint
    alphaedit_alpha: float = 1.0  # α of αI (AlphaEdit)
    # AlphaEdit: C0 eigenvalues below this × their mean.
    null_threshold: float = _SETTINGS.null_threshold
    preserve_weight: float = _SETTINGS.preserve_weight  # weight of earlier batches' K Kᵀ in C
    # A batch's update larger than this × the weight it edits is refused (UnrealisedUpdate);
    # None: no limit. What a healthy batch moves differs between models by more than any one
    # limit allows (docs/guard), so only a model's profile sets one, measured on that model.
    max_update_ratio: float | None = _SETTINGS.max_update_ratio
    # Facts between joint re-solves (VersionedModel.consolidate); None: never. The daemon
    # runs them; the editor only solves.
    consolidate_every: int | None = _SETTINGS.consolidate_every
    # EMMET's ε in the re-solve; None: emmet_eps. The targets of a re-solve are what each fact
    # already realised, so a soft ε shrinks them a second time (see Editor.consolidate).
    consolidate_eps: float | None = _SETTINGS.consolidate_eps
    max_rank: int | None = None  # low-rank keys before refactoring; None: d_in / 4
    stats_tokens: int | None = _SETTINGS.stats_tokens  # None: 10 × d_in
    prefixes: tuple[str, ...] = DEFAULT_PREFIXES
    targets: TargetConfig = field(default_factory=TargetConfig)

    def __post_init__(self) -> None:
        if self.algo not in SOLVERS:
            raise ValueError(f"unknown algo {self.algo!r}; choose from {sorted(SOLVERS)}")
        if self.site not in SITES:
            raise ValueError(f"unknown edit site {self.site!r}; choose from {SITES}")
        if self.split not in SPLITS:
            raise ValueError(f"unknown layer split {self.split!r}; choose from {SPLITS}")
        if self.memory not in FORMS:
            raise ValueError(f"unknown memory {self.memory!r}; choose from {FORMS}")

    @classmethod
    def from_settings(cls, settings: config.EditingSettings) -> EditorConfig:
        """From the `editing` section of the merged settings: the user's keys over the model's
        profile (`editd.models.factory.editor_config` merges them; the editor reads no file).

        Fields named as in the settings are taken as they are; the others are translated
        below. Target keys left empty keep `TargetConfig`'s tuned defaults.
        """
        overrides = {
            "steps": settings.target_steps,
            "lr": settings.target_lr,
            "kl_factor": settings.kl_factor,
            "clamp_norm": settings.clamp_norm_factor,
            "stop_prob": settings.target_stop_prob,
            "prefixes": tuple(settings.target_prefixes) if settings.target_prefixes else None,
        }
        same = {
            f.name: getattr(settings, f.name)
            for f in fields(cls)
            if f.name in type(settings).model_fields and f.name != "layers"
        }
        prefixes = settings.key_prefixes
        return cls(
            **same,
            layers=tuple(settings.layers) if settings.layers else None,
            split=settings.layer_split,
            prefixes=tuple(prefixes) if prefixes is not None else DEFAULT_PREFIXES,
            targets=replace(
                TargetConfig(), **{k: v for k, v in overrides.items() if v is not None}
            ),
        )


class Editor:
    """Computes batch updates for one model and keeps what sequential editing must preserve.

    Not thread-safe: one editing thread calls `compute_update`, `preserve` and `reset_to`.
    """

    def __init__(
        self,
        handle: ModelHandle,
        config: EditorConfig | None = None,
        *,
        corpus: Corpus | None = None,
        calibration: Corpus | None = None,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        """`corpus`: the text C0 is read from. `calibration`: the text per-fact gate
        thresholds are set on (`gate_margin`); None: `corpus`."""
        self.handle = handle
        self.config = config or EditorConfig()
        self.layers = list(self.config.layers or handle.default_layers())
        if not self.layers or max(self.layers) >= handle.num_layers or min(self.layers) < 0:
            raise ValueError(f"layers {self.layers} do not fit a {handle.num_layers}-layer model")
        self.layers.sort()
        normed = [n for n in map(handle.mlp_output_norm, self.layers) if n is not None]
        if normed:
            raise UneditableModel(
                f"{normed[0]} normalises the MLP output before it joins the residual stream; "
                "the closed-form update assumes down_proj's output is added as it is, so its "
                "targets would not be realised and the edit would damage the model. editd "
                "does not edit models with a post-feed-forward norm."
            )
        self.modules = [handle.module_name(i) for i in self.layers]
        self.last_layer = handle.layer_name(self.layers[-1])
        self._corpus = corpus
        self._calibration = calibration
        self._cache = SecondMomentCache(
            Path(cache_dir) if cache_dir else Path.home() / ".cache" / "editd", progress=progress
        )
        self._solve = SOLVERS[self.config.algo]
        if self.config.algo == "emmet":
            self._solve = functools.partial(solve_emmet, eps=self.config.emmet_eps)
        self.preservation: dict[str, Preservation] = {}
        # The gated memory's projection (editd.memory.gate_projection of the gate module's C0).
        self._projection: torch.Tensor | None = None
        # The calibration text as the gate sees it (n, r), when facts get their own thresholds.
        self._reference: torch.Tensor | None = None
        # Keys of the live versions, kept until C0 exists to build preservation on.
        self._pending_keys: list[Mapping[str, torch.Tensor]] | None = None
        self._prepare_lock = threading.Lock()

    @property
    def prepared(self) -> bool:
        return bool(self.preservation)

    def prepare(self) -> float:
        """Load or compute C0 and factor the preservation matrices; returns seconds spent.

        Safe while the model serves edited weights and answers requests: C0 describes the
        base model's keys, so the edited modules' outputs are recomputed from their base
        weights inside the pass (hooks of this thread only), and the read lock is taken per
        chunk, so a weight swap waits for one chunk, not for the whole corpus. Later calls
        return at once; concurrent ones wait for the first.
        """
        with self._prepare_lock:
            if self.preservation:
                return 0.0
            return self._build_preservation()

    def _build_preservation(self) -> float:
        start = time.perf_counter()
        c0s = self.second_moments()
        device = self.handle.device
        cfg = self.config
        if cfg.memory == "gated":
            c0 = c0s[self.modules[0]]
            self._projection = gate_projection(c0, cfg.gate_rank or c0.shape[0])
            if cfg.gate_margin is not None:
                text = self._calibration or self._corpus
                assert text is not None  # second_moments() needed the corpus
                budget = cfg.gate_calibration_tokens or cfg.stats_tokens
                # Half precision: only each fact's highest similarity to it matters, and a
                # large calibration text is the editor's largest resident tensor.
                self._reference = text_embeddings(
                    self.handle,
                    self.modules[0],
                    self._projection,
                    text,
                    budget or default_budget(c0.shape[0]),
                ).half()
        for name, c0 in c0s.items():
            if cfg.algo == "alphaedit":
                pres = Preservation.null_space(
                    c0,
                    cfg.alphaedit_alpha,
                    rel_threshold=cfg.null_threshold,
                    max_rank=cfg.max_rank,
                    device=device,
                )
            else:
                pres = Preservation.from_c0(
                    c0,
                    cfg.mom2_weight,
                    ridge=cfg.norm_weight,
                    max_rank=cfg.max_rank,
                    device=device,
                )
            self.preservation[name] = pres
        if self._pending_keys is not None:
            keys, self._pending_keys = self._pending_keys, None
            for name, pres in self.preservation.items():
                pres.reset([v[name] for v in keys if name in v], cfg.preserve_weight)
        return time.perf_counter() - start

    def second_moments(self) -> dict[str, torch.Tensor]:
        """C0 (float64, CPU) of each edited module, from the cache (computed if missing)."""
        # No fallback text: a real model's C0 from the built-in world's invented sentences
        # describes keys it never sees (editd.models.corpus picks the text per model).
        if self._corpus is None:
            raise ValueError("the editor has no C0 corpus (see editd.models.corpus.stats_corpus)")
        return self._cache.get(self.handle, self.modules, self._corpus, self.config.stats_tokens)

    def compute_update(self, batch: Sequence[FactUpdate]) -> EditUpdate:
        """The update that writes `batch` into the model, one low-rank factor pair per layer.

        Reads the model under its read lock and leaves it unchanged: weights are never
        written (earlier layers' updates act through hooks scoped to this call's own forward
        passes, which other threads' requests do not see). Preservation state is not changed
        either; call `preserve` once the update is applied.

        With `refine_rounds`, the facts whose new object is not greedy top-1 once the update
        acts get another pass: targets re-optimised with the update in, and a correction
        solved on top that holds the batch's other facts where they are (zero residual at
        their keys), so what the batch already realised stays realised.
        """
        if not batch:
            raise ValueError("empty batch")
        facts = list(batch)
        # What is solved for: one row per fact, or per object word at the prompt's last token.
        rows, owner = site_rows(facts, self.config.site)
        timings: dict[str, float] = {"keys": 0.0, "solve": 0.0, "targets": 0.0, "check": 0.0}
        handle = self.handle
        t0 = time.perf_counter()
        timings["stats"] = self.prepare()  # takes the read lock itself, chunk by chunk
        with handle.reading():
            site = self.config.site
            prompts = prompt_set(handle.tokenizer, rows, self.config.prefixes, site=site)
            # At the prompt's last token there are no relation tokens after the site to hold.
            bare = prompt_set(handle.tokenizer, rows, ("",)) if site == "subject_last" else None
            t = time.perf_counter()
            # BOS is held fixed in every layer, so earlier layers' updates never move it.
            anchors = read_anchors(handle, self.modules)
            timings["keys"] += time.perf_counter() - t

            updates: dict[str, LayerUpdate] = {}
            per_layer: dict[str, dict[str, float]] = {}
            gate: Gate | None = None
            todo = list(range(len(rows)))
            refined: list[int] = []
            z_target = torch.empty(0)
            delta_norm = torch.empty(0)
            first_targets = None
            first: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the first pass's keys
            for round_ in range(1 + self.config.refine_rounds):
                if round_:
                    refined.append(len(todo))
                t = time.perf_counter()
                sub = (
                    prompt_set(
                        handle.tokenizer, [rows[j] for j in todo], self.config.prefixes, site=site
                    )
                    if round_
                    else prompts
                )
                z0 = read_at_subject(
                    handle, sub, outputs=[self.last_layer], updates=updates, gate=gate
                )[self.last_layer]
                timings["keys"] += time.perf_counter() - t
                t = time.perf_counter()
                with TraceDict(
                    handle.model, list(edits := update_hooks(updates, gate)), edit_output=edits
                ):
                    targets = compute_targets(
                        handle,
                        [rows[j] for j in todo],
                        self.last_layer,
                        self.config.targets,
                        site=site,
                    )
                timings["targets"] += time.perf_counter() - t
                if first_targets is None:
                    first_targets = targets
                    z_target = z0 + targets.delta.T  # (d, b)
                    delta_norm = targets.delta.norm(dim=1)
                else:
                    z_target[:, todo] = z0 + targets.delta.T
                    delta_norm[todo] = targets.delta.norm(dim=1)
                gate = self._solve_layers(
                    sub, bare, anchors, z_target, todo, updates, gate, per_layer, timings, first
                )
                t = time.perf_counter()
                post_prob, post_top1 = object_probability(
                    handle, facts, edits=update_hooks(updates, gate)
                )
                timings["check"] += time.perf_counter() - t
                todo = [j for j in range(len(rows)) if not bool(post_top1[owner[j]])]
                if not todo:
                    break

            t = time.perf_counter()
            final = read_at_subject(
                handle, prompts, outputs=[self.last_layer], updates=updates, gate=gate
            )
            missing = (z_target - final[self.last_layer]).norm(dim=0)  # (b,)
            timings["check"] += time.perf_counter() - t
            timings["total"] = time.perf_counter() - t0
        assert first_targets is not None
        targets = first_targets

        for name, u in updates.items():
            if not (bool(torch.isfinite(u.left).all()) and bool(torch.isfinite(u.right).all())):
                raise NonFiniteUpdate(f"the update of {name} holds NaN or infinite values")
        self._refuse_oversized(updates, per_layer, float(post_top1.float().mean()))
        # Per fact: a fact solved as several rows is as good as its worst row.
        own = torch.tensor(owner)
        b = len(facts)
        converged = _per_fact(targets.converged.float().cpu(), own, b, "amin")
        diagnostics: dict[str, object] = {
            "algo": self.config.algo,
            "facts": b,
            "rows": len(rows),
            "layers": list(self.modules),
            "seconds": timings,
            "target_prob": _per_fact(targets.prob.cpu(), own, b, "amin").tolist(),
            "target_min_prob": _per_fact(targets.min_prob.cpu(), own, b, "amin").tolist(),
            "target_steps": _per_fact(targets.steps.float().cpu(), own, b, "amax").tolist(),
            "target_converged": float(converged.mean()),
            "refined": refined,
            "residual_norm_before": _per_fact(delta_norm.cpu(), own, b, "amax").tolist(),
            "residual_norm_after": _per_fact(missing.cpu(), own, b, "amax").tolist(),
            "post_prob": post_prob.tolist(),
            "post_top1": float(post_top1.float().mean()),
            "solver": per_layer,
        }
        log.info(
            "edit of %d facts: targets converged %.2f, P(new) %.3f → top-1 after %.3f, %.1fs",
            len(facts),
            diagnostics["target_converged"],
            float(targets.prob.mean()),  # per row
            diagnostics["post_top1"],
            timings["total"],
        )
        if gate is not None:
            gate = replace(gate, keys=gate.keys.cpu())
        return EditUpdate(layers=updates, diagnostics=diagnostics, gate=gate)

    def _solve_layers(
        self,
        prompts: PromptSet,
        bare: PromptSet | None,
        anchors: Mapping[str, torch.Tensor],
        z_target: torch.Tensor,
        todo: Sequence[int],
        updates: dict[str, LayerUpdate],
        gate: Gate | None,
        per_layer: dict[str, dict[str, float]],
        timings: dict[str, float],
        first: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> Gate | None:
        """Solve each edited layer in order for rows `todo`, adding to `updates` in place.

        `prompts` renders the rows `todo`, whose keys are read with the updates so far acting
        (as served: `gate`). The first pass solves every row and keeps each layer's keys and
        relation keys in `first`. A later pass holds the other rows where they are (zero
        residual) at those kept keys instead of reading them again: every correction holds
        them fixed, so they do not move, and reading them cost a refine round as much as the
        first pass's reads. Returns the batch's gate, made from the first layer's keys on the
        first pass.
        """
        handle = self.handle
        n = len(self.modules)
        joint = self.config.split == "joint"
        idx = torch.tensor(list(todo), dtype=torch.long)
        solving = set(todo)
        held = torch.tensor(
            [j for j in range(z_target.shape[1]) if j not in solving], dtype=torch.long
        )
        first_pass = not first
        # `first` is indexed by row, so the pass that fills it must read every row in order.
        assert not first_pass or list(todo) == list(range(z_target.shape[1]))
        for i, name in enumerate(self.modules):
            t = time.perf_counter()
            rest = self.modules[i:] if joint else [name]
            reads = read_at_subject(
                handle, prompts, inputs=rest, outputs=[self.last_layer], updates=updates, gate=gate
            )
            keys = reads[name]  # (d_in, len(todo))
            if gate is None and i == 0:
                # A gated batch is solved against its writes as they will be served: only
                # where its gate opens. The gate is its keys at the first edited layer, which
                # no write of the batch moves.
                gate = self._gate(keys)
            device = keys.device
            missing = z_target[:, idx.to(device)] - reads[self.last_layer]  # (d_out, t)
            if joint:
                resid = layer_share(
                    missing, [reads[m] for m in rest], [self.preservation[m] for m in rest]
                )
            else:
                resid = missing / (n - i)
            if first_pass:
                # The prompt's own relation tokens are held fixed (Δ k = 0): unconstrained,
                # an update large enough to move the subject also moved them, and on the
                # built-in model the edited object was top-1 for 19 % of a batch instead of
                # 88 %. So is BOS, which every position reads.
                relation = (
                    _fixed_keys(read_after_subject(handle, bare, name, updates=updates, gate=gate))
                    if bare is not None
                    else keys[:, :0]
                )
                first[name] = (keys, relation)
            all_keys, relation = first[name]
            fixed = torch.cat(
                [all_keys[:, held.to(device)], relation, anchors[name]], dim=1
            )  # (d_in, m)
            timings["keys"] += time.perf_counter() - t
            t = time.perf_counter()
            sol = self._solve(
                torch.cat([keys, fixed], dim=1),
                torch.cat([resid, resid.new_zeros(resid.shape[0], fixed.shape[1])], dim=1),
                self.preservation[name],
            )
            timings["solve"] += time.perf_counter() - t
            # Fixed keys carry zero residual, so the update still has rank ≤ len(todo).
            left, right = _compress(sol.left, sol.right, len(todo))
            before = updates.get(name)
            if before is None:
                updates[name] = LayerUpdate(
                    left=left.float(), right=right.float(), keys=keys.float()
                )
                per_layer[name] = sol.diagnostics
            else:
                merged = LayerUpdate(
                    left=torch.cat([before.left, left.float()], dim=1),
                    right=torch.cat([before.right, right.float()], dim=0),
                    keys=before.keys,
                )
                updates[name] = merged
                per_layer[name] = {
                    **sol.diagnostics,
                    "update_norm": _lowrank_norm(merged.left, merged.right),
                }
        return gate

    @property
    def gated(self) -> bool:
        return self.config.memory == "gated"

    def _gate(self, keys: torch.Tensor) -> Gate | None:
        """The batch's gate when it is served through a gated memory: its facts' keys (d_in, b)
        at the first edited layer, embedded for comparison with each token's input there."""
        if not self.gated:
            return None
        assert self._projection is not None  # set by prepare()
        embedded = embed(keys.T.float(), self._projection)
        thresholds = None
        margin = self.config.gate_margin
        if margin is not None:
            assert self._reference is not None  # read by prepare() whenever a margin is set
            thresholds = calibrated_thresholds(
                embedded, self._reference, self.config.gate_threshold, margin
            )
        return Gate(
            module=self.modules[0],
            threshold=self.config.gate_threshold,
            projection=self._projection,
            keys=embedded,
            thresholds=thresholds,
        )

    def _refuse_oversized(
        self,
        updates: Mapping[str, LayerUpdate],
        per_layer: dict[str, dict[str, float]],
        post_top1: float,
    ) -> None:
        """Refuse an update that would move a layer by more than `max_update_ratio` × its norm
        (when the model's profile or the settings set one; the ratios are recorded either way).

        The closed form trusts that a layer's write reaches the last edited layer unchanged.
        When it does not (layers far apart, a norm after the MLP), later layers are asked to
        make up what earlier ones missed, and the last one ends up with a huge residual: its
        targets converged, yet the update destroys the model. That is never applied silently.
        """
        worst_name, worst = "", 0.0
        for name in updates:
            # The solver already has ‖Δ‖ from its factors; no dense product on the edit path.
            weight = float(self.handle.weight(name).double().norm())
            ratio = per_layer[name]["update_norm"] / max(weight, 1e-30)
            per_layer[name]["update_ratio"] = ratio
            if ratio > worst:
                worst_name, worst = name, ratio
        limit = self.config.max_update_ratio
        if limit is not None and worst > limit:
            raise UnrealisedUpdate(
                f"the update would move {worst_name} by {worst:.2f} × its norm (limit "
                f"editing.max_update_ratio = {limit:g}); after it, "
                f"{post_top1:.0%} of the batch's new objects were top-1. The edited layers "
                f"{self.layers} are too far apart for their writes to add up, or C0 does not "
                "describe this model: edit fewer, closer layers (editd model profile)"
            )

    def consolidate(
        self,
        keys: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        current: Mapping[str, torch.Tensor],
    ) -> EditUpdate:
        """Re-solve every live fact at once from the base weights, as one batch would.

        `keys[m]` (d_in, n) are the live facts' keys at module m as stored when each was
        edited, `targets[m]` (d_out, n) what the accumulated update then added at them
        (D_v k), `current[m]` the accumulated update served now. Sequential batches each
        preserve earlier keys only softly (beside λC0 they weigh little), so their sum carries
        updates that later batches spent undoing and redoing; the joint solve meets the same
        targets with the least C-norm the solver allows. BOS stays where it is now.

        Returns the joint solve as a version that replaces the accumulated update (D = its
        product, `LayerUpdate.replaces`): no facts, no new keys, rank n + anchors per module, or
        the dense product where that is smaller. The model is read, not written.
        """
        if self.gated:
            raise ValueError(
                "a gated memory is not consolidated: its blocks do not add up in the weights, "
                "so there is no accumulated leak for a joint re-solve to return"
            )
        self.prepare()
        with self.handle.reading():
            anchors = read_anchors(self.handle, self.modules)
        solve = self._solve
        if self.config.algo == "emmet" and self.config.consolidate_eps is not None:
            solve = functools.partial(solve_emmet, eps=self.config.consolidate_eps)
        layers: dict[str, LayerUpdate] = {}
        per_layer: dict[str, dict[str, float]] = {}
        for name in self.modules:
            if name not in keys or keys[name].shape[1] == 0:
                continue
            now = current[name].to(SOLVE_DTYPE)
            anchor = anchors[name].to(now)
            k = torch.cat([keys[name].to(now), anchor], dim=1)
            t = torch.cat([targets[name].to(now), now @ anchor], dim=1)
            sol = solve(k, t, self.preservation[name].fresh())
            left, right = sol.left.to(now), sol.right.to(now)  # (d_out, r), (r, d_in)
            d_out, d_in = now.shape
            if left.shape[1] * (d_out + d_in) >= d_out * d_in:
                # More live facts than the factors save (r ≥ 419 on SmolLM2, ≥ 3,186 at
                # Llama-3-8B's 4,096 × 14,336): the product itself, times an identity.
                full = left @ right
                eye = torch.eye(min(d_out, d_in), dtype=now.dtype)
                left, right = (eye, full) if d_out <= d_in else (full, eye)
            layers[name] = LayerUpdate(
                left=left.float(),
                right=right.float(),
                keys=now.new_zeros(d_in, 0).float(),
                replaces=True,
            )
            per_layer[name] = {**sol.diagnostics, "keys": float(keys[name].shape[1])}
        return EditUpdate(
            layers=layers, diagnostics={"algo": self.config.algo, "consolidated": per_layer}
        )

    def preserve(self, update: EditUpdate) -> None:
        """The daemon applied `update`: preserve its keys in later batches.

        A gated memory preserves nothing beyond λC0: a later batch's block opens only where
        its own facts' keys are read, so it cannot leak into an earlier fact's prompts, and
        where it does open on an earlier fact (the same subject again) its residual was
        computed with the earlier block open, so it writes only the difference.
        """
        if self.gated:
            return
        for name, layer in update.layers.items():
            self.preservation[name].add(layer.keys, self.config.preserve_weight)

    def reset_to(self, keys_per_version: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Preserve exactly the keys of these versions (after a restore or a rollback).

        Before C0 exists the keys are kept and applied once it does, so a restart serves at
        once and only the first edit waits for C0.
        """
        versions = [] if self.gated else list(keys_per_version)
        with self._prepare_lock:
            if not self.preservation:
                self._pending_keys = versions
                return
            for name, pres in self.preservation.items():
                pres.reset([v[name] for v in versions if name in v], self.config.preserve_weight)


def site_rows(facts: Sequence[FactUpdate], site: str) -> tuple[list[FactUpdate], list[int]]:
    """The rows an update is solved for, and the fact each row belongs to.

    At the subject (MEMIT's site) one row per fact: every later position attends to the
    edited subject, so the whole object follows. At the prompt's last token an update reaches
    only the object's first token, and an object whose first word many objects share
    ("San Lakbrath", "the Feltral Falcons") would stop there. Each further word gets its own
    row then: the prompt followed by the words before it, so the position that predicts that
    word is edited too.
    """
    if site != "prompt_last":
        return list(facts), list(range(len(facts)))
    rows: list[FactUpdate] = []
    owner: list[int] = []
    for i, fact in enumerate(facts):
        words = fact.target_new.split()
        # Braces in an object would be read as the subject placeholder in a row's prompt.
        if len(words) < 2 or "{" in fact.target_new or "}" in fact.target_new:
            rows.append(fact)
            owner.append(i)
            continue
        for j, word in enumerate(words):
            prompt = " ".join([fact.prompt.rstrip(), *words[:j]])
            rows.append(fact.model_copy(update={"prompt": prompt, "target_new": word}))
            owner.append(i)
    return rows, owner


def _lowrank_norm(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖left @ right‖_F without the dense product."""
    left, right = left.double(), right.double()
    return float(torch.sqrt(((left.T @ left) * (right @ right.T)).sum().clamp(min=0)))


def _per_fact(values: torch.Tensor, owner: torch.Tensor, n: int, reduce: str) -> torch.Tensor:
    out = torch.zeros(n, dtype=values.dtype)
    return out.scatter_reduce(0, owner, values, reduce=reduce, include_self=False)


def _fixed_keys(keys: torch.Tensor) -> torch.Tensor:
    """At most d_in / 4 directions spanning `keys` (d_in, m), strongest first.

    Relation words repeat across a batch, so their keys are nearly collinear; keeping the
    leading directions holds them fixed without spending the layer's whole input space on
    equality constraints (EMMET needs fewer constraints than d_in).
    """
    cap = keys.shape[0] // 4
    if keys.shape[1] <= cap:
        return keys
    u, s, _ = torch.linalg.svd(keys.double(), full_matrices=False)
    return (u[:, :cap] * s[:cap]).to(keys.dtype)


def _compress(
    left: torch.Tensor, right: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refactor left @ right (inner size k) to inner size `rank`, exactly when its rank allows.

    The product's rank is also at most d_out, which can be below `rank` (a batch with more
    rows than the layer has outputs): then the inner size is d_out.
    """
    if left.shape[1] <= rank:
        return left, right
    ql, rl = torch.linalg.qr(left.double())  # (d_out, j), (j, k), j = min(d_out, k)
    qr, rr = torch.linalg.qr(right.double().T)  # (d_in, k), (k, k)
    u, s, vh = torch.linalg.svd(rl @ rr.T, full_matrices=False)  # (j, j), (j,), (j, k)
    return (ql @ (u[:, :rank] * s[:rank])).to(left.dtype), (vh[:rank] @ qr.T).to(right.dtype)
