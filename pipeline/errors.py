"""The error a user can act on: bad config, data, teacher or cache. The CLI prints its message, not a traceback."""


class PipelineError(ValueError):
    """Base of every user-facing error; its message names the file, key or field, what was found and expected."""
