"""Gradients of a readout with respect to every recorded site: one backward pass over the recorded forward, with
each nonlinearity frozen or not (backward.py). The attribution methods built on it (gradient x activation, AtP,
AtP*, GradDrop, integrated gradients) are interventions' (refprism/interventions/attribution.py): they score the
components validate patches.

    backward.py     the backward pass with its freeze switches and GradDrop, the readouts it starts from

Public: every name below. May import: prisms (its readouts: one readout mechanism), model, gemma, errors, files.
"""

import sys

from refprism.gradients.backward import FREEZABLE, READOUTS, Gradients, gradients

__all__ = ["FREEZABLE", "READOUTS", "Gradients", "gradients"]


class _CallablePackage(sys.modules[__name__].__class__):
    """refprism.gradients is both this package and its main function: `refprism.gradients(model, prompt, ...)` is
    backward.gradients, and `refprism.gradients.backward` etc. stay the modules (Python allows a module's class to
    be replaced by a subclass of ModuleType)."""

    def __call__(self, *args, **kwargs):
        return gradients(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
