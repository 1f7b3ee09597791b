"""What "these facts cannot be edited" means, as types.

The daemon treats a failed edit in one of two opposite ways, and the exception's type alone
decides which (editd/daemon/service.py):

- `Uneditable` and its subclasses: the facts themselves cannot be written into this model
  (their answer has no token of its own, the update they need would wreck a layer or comes out
  non-finite). Replaying them gives the same answer, so the batch is rejected into the outbox
  (`facts.rejected`) and the consumer moves on.
- anything else (a `TypeError`, an `IndexError`, a `LinAlgError`, a shape error from torch):
  the facts may be fine and the code or the device is not. Rejecting them would lose valid
  facts, so the daemon stops with its exit code and the batch is replayed after the restart.

A refused batch is split before anything is rejected (`worth_splitting`): a refusal is usually
one fact's doing (an answer without a token, a target that will not converge, a key the others
cannot be held apart from), and rejecting the whole batch would lose the facts beside it.

They subclass `ValueError` so code that already caught a bad argument as a `ValueError` keeps
working; nothing in the daemon catches `ValueError` to decide a batch's fate.
"""

from __future__ import annotations


class Uneditable(ValueError):
    """These facts cannot be edited into this model; the message says why. Rejected, not
    retried."""


class UneditableModel(Uneditable):
    """The model's architecture breaks an assumption of the update; the message names it."""


class UnrealisedUpdate(Uneditable):
    """The batch's update would change a layer out of all proportion; nothing was applied."""


class NonFiniteUpdate(Uneditable):
    """The batch's update holds NaN or infinite values; nothing was applied."""


class UnplaceableFact(Uneditable):
    """A fact's subject or answer has no token of its own in this tokenizer (the answer merged
    into the prompt's last token, or was cut off), so there is no position to edit at."""


def worth_splitting(exc: Uneditable, facts: int) -> bool:
    """Whether a refusal of `facts` facts should be retried as two halves before rejecting.

    Every caller that applies batches (the daemon, the benchmarks) asks this, so that the facts
    rejected are the ones a user would see rejected. Halving down to single facts costs about
    twice the batch's edit per fact at fault and isolates it. `UneditableModel` is the model's
    doing, not the facts': every part would be refused the same way.
    """
    return facts > 1 and not isinstance(exc, UneditableModel)
