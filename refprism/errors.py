"""One exception family for everything refprism refuses.

The CLI prints `refprism: error: <message>` on one line and exits with `exit_code`; the library raises the
same exception with the same message. Messages name the problem and say what to do.
"""


class RefprismError(Exception):
    """Base class: every error refprism raises on purpose."""

    exit_code = 2


class ConfigError(RefprismError):
    """config.json missing, malformed, unsupported or with impossible values."""


class CheckpointError(RefprismError):
    """Weights or tokenizer files missing, malformed, mis-shaped or refused (pickles)."""


class AccessError(RefprismError):
    """The hub could not provide the model: gated, missing, or offline with an empty cache."""


class InputError(RefprismError):
    """A prompt, token id, target, index or argument that does not fit the model."""


class OutputError(RefprismError):
    """An output file could not be written (disk full, permissions): nothing half-written is left behind."""

    exit_code = 1


class ToolError(RefprismError):
    """An external tool (llama.cpp's binaries, llama-cpp-python) is missing or failed."""
