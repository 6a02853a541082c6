"""refprism: a NumPy reference implementation of gemma-2b (and the Gemma text family) with exact logit prisms.

The public surface: `load` -> Model, `Model.run` -> Run (its Record holds every activation by name), `prisms.*`
(exact splits of a readout), `patch` / `validate` (interventions), `gradients(model, prompt, ...)` (one backward
pass: every site's gradient; the attribution methods), `compare` (another implementation against the
reference), and the exception family. The packages, lowest layer first (import-linter holds the order,
pyproject.toml): errors, files, figures; gemma (the architecture); checkpoints (files in, arrays out); model;
prisms; interventions | crosscheck; gradients; sweeps | report; demo; cli. Each package's docstring says what is in it.
"""

import os as _os

# After each threaded product OpenBLAS's idle threads spin for 2^28 cycles (~0.1 s) on the cores that ops.matmul's
# slice threads need next (gemma-2b's forward at T = 16, two cores: 1.9 -> 1.2 s with 2^20, docs/performance.md).
# OpenBLAS reads this when it loads (with NumPy): import refprism first, or set it yourself.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

# refprism.prisms.needs, ... without a second import; refprism.gradients is a callable package (gradients(model, ...))
from refprism import gradients, prisms  # noqa: F401
from refprism.crosscheck import compare
from refprism.errors import AccessError, CheckpointError, ConfigError, InputError, OutputError, RefprismError
from refprism.gemma.config import Config
from refprism.gemma.forward import forward, forward_packed
from refprism.gemma.record import RECORD_TABLE, Record
from refprism.graphs import graph
from refprism.interventions import patch, validate
from refprism.model import Model, Run, load

__all__ = ["compare", "graph", "patch", "validate", "Config", "Model", "Run", "Record", "RECORD_TABLE", "load",
           "forward", "forward_packed", "RefprismError", "ConfigError", "CheckpointError", "AccessError", "InputError",
           "OutputError"]
__version__ = "0.1.0"
