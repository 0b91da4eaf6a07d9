"""The error a user can act on: bad config, data, teacher or cache. The CLI prints its message, not a traceback."""


class PipelineError(ValueError):
    """Base of every user-facing error; its message names the file, key or field, what was found and expected."""


class ConfigError(PipelineError):
    """A config file or override is invalid; the message names the key."""


def require(condition: bool, key: str, value: object, expected: str) -> None:
    """Raise a ConfigError naming `key`, the `value` found and what was `expected`, unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key}: got {value!r}, expected {expected}")
