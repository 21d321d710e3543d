"""Batches as PostgreSQL array literals, and task ids made in bulk.

A list handed to psycopg as a parameter is dumped element by element in Python; one string that
PostgreSQL parses with an `::type[]` cast costs a join. For a batch of a thousand tasks that is the
difference between milliseconds and a fraction of one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable


def text_array(values: Iterable[str]) -> str:
    """A PostgreSQL array literal of text values: `{"a","b \\"c\\""}`. Every element is quoted, so
    commas, braces, spaces and the word NULL stay text; inside quotes only `\\` and `"` need escaping.
    (A NUL cannot go in any text parameter: psycopg refuses it, as it refuses one in a list of str.)"""
    quoted = ('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' for value in values)
    return "{" + ",".join(quoted) + "}"


def number_array(values: Iterable[int | float | None]) -> str:
    """A PostgreSQL array literal of numbers, None as NULL (repr of a finite float is exact and is
    valid float8 input)."""
    return "{" + ",".join("NULL" if value is None else repr(value) for value in values) + "}"


def uuid_array(values: Iterable[uuid.UUID]) -> str:
    """A PostgreSQL array literal of UUIDs (32 hex digits each, which the uuid type reads)."""
    return "{" + ",".join(value.hex for value in values) + "}"


def random_uuid4s(count: int) -> list[str]:
    """`count` random (version 4) UUIDs in canonical form, as str(uuid.uuid4()) gives, for a fraction
    of its cost: one read of the system's random source for all of them."""
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = bytes([(b & 0x0F) | 0x40 for b in raw[6::16]])  # version 4
    raw[8::16] = bytes([(b & 0x3F) | 0x80 for b in raw[8::16]])  # RFC 4122 variant
    h = raw.hex()
    return [f"{h[i:i + 8]}-{h[i + 8:i + 12]}-{h[i + 12:i + 16]}-{h[i + 16:i + 20]}-{h[i + 20:i + 32]}"
            for i in range(0, 32 * count, 32)]
