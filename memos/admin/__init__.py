"""Operator tools behind ``memos admin``: they call the same domain code as the API, outside any request."""
