"""The ``hf-badm`` application: recipes, runs, data and plots on top of the library.

The library (``hf_badm`` outside this package) never imports from here, except ``hf_badm.data``
re-exporting the data helpers that users import from it. Errors in a user's recipe or data are
``RecipeError``; a run that started and ended otherwise than asked is ``RunEnded``; only
``hf_badm.app.cli.main`` turns them into a message and an exit code.
"""


class RecipeError(ValueError):
    """A recipe value, path or data source that cannot work: the message names it and says what to do."""


class RunEnded(Exception):
    """A run that ends early with one line and an exit code: nothing to do (0), stopped by a signal, or unable to
    go on (non-finite steps, a full disk). ``resume``: None when there is nothing to continue, else whether the
    command that continues it resumes from a checkpoint (the CLI appends that command to the line)."""

    def __init__(self, message: str, code: int, resume: bool | None = None) -> None:
        super().__init__(message)
        self.code, self.resume = code, resume
