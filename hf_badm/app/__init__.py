"""The ``hf-badm`` application: recipes, runs, data and plots on top of the library.

The library (``hf_badm`` outside this package) never imports from here, except ``hf_badm.data``
re-exporting the data helpers that users import from it. Errors in a user's recipe or data are
``RecipeError``; only ``hf_badm.app.cli.main`` turns them into a message and an exit code.
"""


class RecipeError(ValueError):
    """A recipe value, path or data source that cannot work: the message names it and says what to do."""
