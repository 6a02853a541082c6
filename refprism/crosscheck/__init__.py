"""Compare: check another Gemma implementation against the reference, site by site, and name the first wrong op.

Mechanism: four refprism passes over the same tokens (reference R, replay P, honest run F, honest replay Q; all
through `gemma.forward`'s one edit hook) give each site its error, its local error and the floors an honest
implementation at the other side's dtype would show; the first site whose local error exceeds its local floor is
the first wrong op, and the catalogue of known mistakes, run there, names it (docs/compare.md).

    capture.py    what every other side hands over (Capture, Summary, GgmlArithmetic)
    floors.py     honest-arithmetic profiles, floors' constants, the metrics of a site
    ggml.py       ggml's CPU arithmetic (llama.cpp's roundings) as a forward edit, for llama.cpp's floors
    replay.py     the four passes (replay and honest edits)
    catalogue.py  the catalogue of known Gemma mistakes and the diagnosis at the first wrong op
    result.py     SiteResult / CompareResult: printing, JSON, exit status
    compare.py    `compare()`: the driver
    plots.py      the comparison figure
    sides/        the other side, in refprism's names: hf (transformers live), tl (TransformerLens), llamacpp
                  (llama-debug and llama-cpp-python), dumps (a file of your own port). A side imports only
                  capture.py of this package, so the sides never depend on the comparison that runs them.

Public: compare, check_against, CompareResult, SiteResult, CATALOGUE, TOKEN_MISTAKES, Mistake, Profile,
profile_of. May import: gemma, checkpoints, model, errors, files, figures (not prisms or other capabilities).
"""

from refprism.crosscheck.catalogue import CATALOGUE, TOKEN_MISTAKES, Mistake
from refprism.crosscheck.compare import LIVE, check_against, compare
from refprism.crosscheck.floors import Profile, profile_of
from refprism.crosscheck.result import CompareResult, SiteResult

__all__ = ["CATALOGUE", "LIVE", "TOKEN_MISTAKES", "CompareResult", "Mistake", "Profile", "SiteResult",
           "check_against", "compare", "profile_of"]
