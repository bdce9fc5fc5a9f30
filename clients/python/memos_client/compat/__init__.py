"""Adapters that let code written for other memory layers run on memos.

Each lives in its own module and is imported explicitly, so the core client stays light:
``memos_client.compat.langgraph`` (needs the ``[langgraph]`` extra) and ``memos_client.compat.mem0``.
"""
