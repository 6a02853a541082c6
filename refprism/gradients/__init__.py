"""Gradients of a readout with respect to every recorded site: one backward pass over the recorded forward, with
each nonlinearity frozen or not (backward.py), and the attribution methods built on it (attribution.py)."""

from .backward import FREEZABLE, READOUTS, Gradients, backward, gradients

__all__ = ["FREEZABLE", "READOUTS", "Gradients", "backward", "gradients"]
