"""Array literals and bulk ids (distrack.db.literals), read back by a real PostgreSQL."""

import uuid

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distrack.db.literals import number_array, random_uuid4s, text_array, uuid_array

AWKWARD_TEXT = ["echo hello", "", " padded ", "NULL", "null", 'say "hi"', "back\\slash", "\\", '\\"', "a,b",
                "{nested}", "}{", "line\nbreak\ttab", "héllo ✓ 😀", "'quoted'"]


@pytest.fixture(scope="module")
def conn(module_db_url):
    with psycopg.connect(module_db_url, autocommit=True) as conn:
        yield conn


def test_text_array_quotes_every_element():
    assert text_array(["echo hello", "echo hello"]) == '{"echo hello","echo hello"}'
    assert text_array(['say "hi"', "back\\slash", "a,b{c}"]) == '{"say \\"hi\\"","back\\\\slash","a,b{c}"}'
    assert text_array([]) == "{}"


def test_text_arrays_read_back_exactly(conn):
    assert conn.execute("SELECT %s::text[]", (text_array(AWKWARD_TEXT),)).fetchone()[0] == AWKWARD_TEXT


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30),
                max_size=8))
def test_any_text_without_nul_reads_back_exactly(conn, values):
    assert conn.execute("SELECT %s::text[]", (text_array(values),)).fetchone()[0] == values


def test_number_arrays_read_back_exactly_with_nulls(conn):
    floats = [None, 0.5, 1e-05, 1e-6, 30.0, 604800.0, 0.1 + 0.2, 5e-324, 1.7976931348623157e308]
    assert conn.execute("SELECT %s::float8[]", (number_array(floats),)).fetchone()[0] == floats
    ints = [0, 1, 31_622_400_000_000, 2**53]
    assert conn.execute("SELECT %s::bigint[]", (number_array(ints),)).fetchone()[0] == ints
    assert conn.execute("SELECT %s::int[]", (number_array(x for x in (1, 100)),)).fetchone()[0] == [1, 100]


def test_random_uuid4s_are_distinct_canonical_version_4_ids(conn):
    ids = random_uuid4s(2000)
    assert len(set(ids)) == 2000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert [str(u) for u in conn.execute("SELECT %s::uuid[]", (text_array(ids),)).fetchone()[0]] == ids
    assert random_uuid4s(0) == []


def test_uuid_arrays_read_back_exactly(conn):
    ids = [uuid.uuid4() for _ in range(5)] + [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1)]
    assert conn.execute("SELECT %s::uuid[]", (uuid_array(ids),)).fetchone()[0] == ids
    assert uuid_array([]) == "{}"
