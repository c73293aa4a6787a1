"""compression/'s own errors (every one a TwinserveError: exit 2, one line naming the field)."""
from __future__ import annotations

from twin.errors import TwinserveError


class RecipeError(TwinserveError):
    """A recipe file that cannot be read or does not validate; the message names the field."""
