"""Reading pg_dumpall's globals into statements: quotes, comments and psql meta-commands."""

from __future__ import annotations

import pytest

from backup_pipelines.engine.errors import RestoreFailedError
from backup_pipelines.engine.restore.roles import (
    _MEMBERSHIP,
    _ROLE_STATEMENT,
    parse_ident,
    split_statements,
)

GLOBALS = "\n".join(
    [
        "--",
        "-- PostgreSQL database cluster dump",
        "--",
        "",
        "\\restrict AbC123",
        "",
        "SET default_transaction_read_only = off;",
        "",
        'CREATE ROLE "app; role";',
        "ALTER ROLE \"app; role\" WITH NOSUPERUSER LOGIN PASSWORD 'SCRAM-SHA-256$4096:x;y';",
        'COMMENT ON ROLE "app; role" IS \'line 1;',
        "-- not a comment",
        "line ''2''';",
        'CREATE ROLE "Prüfer ""ü""";',
        'ALTER ROLE "Prüfer ""ü""" SET search_path TO \'hr\', \'public\';',
        'GRANT reader TO "app; role" WITH ADMIN OPTION GRANTED BY postgres;',
        'GRANT reader TO "Prüfer ""ü""" GRANTED BY postgres;',
        "",
        "\\unrestrict AbC123",
        "",
        "--",
        "-- PostgreSQL database cluster dump complete",
        "--",
        "",
    ]
)


def test_statements_keep_quoted_semicolons_newlines_and_skip_meta_commands() -> None:
    statements = split_statements(GLOBALS)
    assert statements[0] == "SET default_transaction_read_only = off"
    assert statements[1] == 'CREATE ROLE "app; role"'
    assert statements[2].endswith("PASSWORD 'SCRAM-SHA-256$4096:x;y'")
    assert (
        statements[3] == "COMMENT ON ROLE \"app; role\" IS 'line 1;\n-- not a comment\nline ''2'''"
    )
    assert len(statements) == 8
    assert not any("restrict" in s for s in statements)


def test_role_names_and_memberships_are_read_exactly() -> None:
    statements = split_statements(GLOBALS)
    subjects = [
        parse_ident(m.group(1)) for s in statements if (m := _ROLE_STATEMENT.match(s)) is not None
    ]
    assert subjects == ["app; role", "app; role", "app; role", 'Prüfer "ü"', 'Prüfer "ü"']
    first, second = (m for s in statements if (m := _MEMBERSHIP.match(s)) is not None)
    assert (parse_ident(first.group(1)), parse_ident(first.group(2))) == ("reader", "app; role")
    assert first.group(3).strip() == "WITH ADMIN OPTION"  # kept; GRANTED BY is dropped
    assert (parse_ident(second.group(2)), second.group(3)) == ('Prüfer "ü"', "")


def test_a_globals_file_cut_inside_a_statement_is_refused() -> None:
    with pytest.raises(RestoreFailedError, match="incomplete"):
        split_statements("CREATE ROLE app;\nALTER ROLE app WITH LOGIN PASSWORD 'abc")
