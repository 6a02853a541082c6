"""refprism: a NumPy reference implementation of gemma-2b with exact logit prisms."""

from .config import Config
from .crosscheck import compare
from .errors import AccessError, CheckpointError, ConfigError, InputError, OutputError, RefprismError
from .forward import forward, forward_packed
from .interventions import patch, validate
from .model import Model, Run, load
from .record import RECORD_TABLE, Record
from . import prisms  # noqa: F401  (refprism.prisms.needs, ... without a second import)

__all__ = ["compare", "patch", "validate", "Config", "Model", "Run", "Record", "RECORD_TABLE", "load", "forward",
           "forward_packed", "RefprismError", "ConfigError", "CheckpointError", "AccessError", "InputError",
           "OutputError"]
__version__ = "0.1.0"
