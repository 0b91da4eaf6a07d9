"""The corpus, from sources to packed sequences: `sources` resolves and reads the documents (and fetches the demo
corpus), `prepare` tokenizes and packs them (`distill prepare`) and opens the result. Both raise `DataError`."""

from pipeline.errors import PipelineError


class DataError(PipelineError):
    """A source, tokenizer or prepared directory is unusable; the message names the file or field."""
