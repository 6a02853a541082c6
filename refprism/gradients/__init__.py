"""Gradients of a readout with respect to every recorded site: one backward pass over the recorded forward, with
each nonlinearity frozen or not (backward.py), and the attribution methods built on it (attribution.py).

    backward.py  the backward pass with its freeze switches and GradDrop, the readouts it starts from

Public: every name below. May import: interventions, crosscheck, prisms, model, gemma, errors, files, figures.
"""

from refprism.gradients.backward import FREEZABLE, READOUTS, Gradients, backward, gradients

__all__ = ["FREEZABLE", "READOUTS", "Gradients", "backward", "gradients"]
