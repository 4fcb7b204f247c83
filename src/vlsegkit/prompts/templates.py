"""Per-dataset prompt templates (P0..P9) and attribute prompts built from masks.

The implementation lives in :mod:`vlsegkit.data.templates` (next to the datasets that use it); this
module is the documented home ``vlsegkit.prompts.templates``.
"""

from ..data.templates import *  # noqa: F403
from ..data.templates import __all__  # noqa: F401
