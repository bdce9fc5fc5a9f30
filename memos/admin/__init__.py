"""Operator tools behind ``memos admin``: they call the same domain code as the API, outside any request."""


class AdminError(Exception):
    """A tool's target or input that is not right (a bad bundle, no such agent or key): said, and exit 1."""
