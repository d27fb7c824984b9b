"""Errors a user can act on: the CLI prints their message without a traceback."""


class MetaflowError(Exception):
    """Base of every expected failure (bad input, missing data, registry refusals)."""


class DataError(MetaflowError):
    """A data source is missing, corrupt, or cannot yield the requested tasks."""


class ConfigError(MetaflowError):
    """params.yaml (or a CLI override) is invalid."""


class RegistryError(MetaflowError):
    """A registered model, version or alias is unknown, or a promotion is refused."""


class PayloadError(MetaflowError):
    """A predict request does not follow the contract."""


class DivergenceError(MetaflowError):
    """Training produced NaN/inf; the message names the step and the last good checkpoint."""


class Interrupted(MetaflowError):
    """SIGINT/SIGTERM stopped the work after a final checkpoint; the exit code is 128 + the signal (0 when the
    work stopped itself, at the end of a time allowance)."""

    def __init__(self, message: str, signal_number: int | None) -> None:
        super().__init__(message)
        self.exit_code = 0 if signal_number is None else 128 + signal_number
