"""refprism: a NumPy reference implementation of gemma-2b with exact logit prisms."""

from refprism import prisms  # noqa: F401  (refprism.prisms.needs, ... without a second import)
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
