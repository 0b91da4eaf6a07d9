"""Teachers and students as models: `loading` builds and loads them, `capture` records their attention,
`teacher_import` makes the teacher directory every stage loads (a GGUF source through `gguf_import`). Both import
modules raise `TeacherImportError`."""

from pipeline.errors import PipelineError


class TeacherImportError(PipelineError):
    """A teacher source or output directory is unusable; the message names the path and what was expected."""
