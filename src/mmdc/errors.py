"""User-facing errors.

An :class:`MmdcError` is a problem with the user's input (config, dataset, image, model
folder): the CLI prints its message as one line on stderr and exits non-zero, with no
traceback. Messages name the file and the field, line or instance id.
"""


class MmdcError(Exception):
    """A problem with the user's input, reported as one clear line."""


class ConfigError(MmdcError):
    pass


class DataError(MmdcError):
    pass


class ModelError(MmdcError):
    pass


class TrainingError(MmdcError):
    """Training went wrong in a way the user must act on (a diverged loss, say)."""


class BackendError(MmdcError):
    """A teacher backend (a served endpoint, vLLM) failed after its retries."""
