"""Gradients of a readout with respect to every recorded site: one backward pass over the recorded forward, with
each nonlinearity frozen or not (backward.py), and the attribution methods built on it (attribution.py).

    backward.py     the backward pass with its freeze switches and GradDrop, the readouts it starts from
    attribution.py  gradient x activation, AtP (noising, denoising), AtP*'s QK fix, GradDrop, integrated gradients

Public: every name below. May import: interventions, crosscheck, prisms, model, gemma, errors, files, figures.
"""

import sys

from refprism.gradients.attribution import METHODS, Attribution, attribute
from refprism.gradients.backward import FREEZABLE, READOUTS, Gradients, gradients

__all__ = ["FREEZABLE", "METHODS", "READOUTS", "Attribution", "Gradients", "attribute", "gradients"]


class _CallablePackage(sys.modules[__name__].__class__):
    """refprism.gradients is both this package and its main function: `refprism.gradients(model, prompt, ...)` is
    backward.gradients, and `refprism.gradients.backward` etc. stay the modules (Python allows a module's class to
    be replaced by a subclass of ModuleType)."""

    def __call__(self, *args, **kwargs):
        return gradients(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
