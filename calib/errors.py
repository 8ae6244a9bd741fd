"""The one error type of the data layer, so callers can catch bad data separately from bugs."""


class DataError(ValueError):
    """Bad data or a bad data request; the message names the file (or source/split) and the rule broken."""
