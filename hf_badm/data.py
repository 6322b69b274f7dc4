"""``hf_badm.data``: the data helpers of :mod:`hf_badm.app.data` (built-in corpus, instruction tasks,
tokenizer, loading, blocking) under the name the README and user scripts import."""

from hf_badm.app.data import *  # noqa: F403
from hf_badm.app.data import __all__  # noqa: F401
