"""`DataError`: a data file or record that cannot train, with where it is (file and line,
or record) and which field, kept apart for reports. Public as `jaxft.data.formats.DataError` too."""

from __future__ import annotations

from jaxft import errors


class DataError(errors.DataError):
    """A record or source that cannot be used, with where it is and what is wrong.

    str(err) is "LOCATION: MESSAGE"; `location`, `field` (or None) and `message` are kept
    apart for reports.
    """

    def __init__(self, location: str, message: str, *, field: str | None = None):
        super().__init__(f"{location}: {message}")
        self.location = location
        self.message = message
        self.field = field

    def __reduce__(self):  # picklable (tokeniser worker processes send these back)
        return type(self), (self.location, self.message), {"field": self.field}
