"""Test doubles: stand-ins that speak a real database's wire protocol.

A double here is not the database. It exists so the real client library can be pointed at
something on 127.0.0.1 when the real server cannot run (no Docker, no network): the client's
own handshake, request encoding and response parsing all run unmodified, and the double
computes answers with the documented semantics of the server it imitates. Whatever a double
does not implement it refuses loudly; it never answers as if an unsupported option had been
applied. Tests against a real server (gated by an environment variable) remain the authority.
"""

from tests.doubles.weaviate_double import WeaviateProtocolDouble

__all__ = ["WeaviateProtocolDouble"]
