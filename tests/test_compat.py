"""Which envs get repaired: old dbt releases with dependency versions known to break them
(tests/test_postgres.py shows a repaired dbt-postgres 1.7 running on a real server)."""

from __future__ import annotations

import pytest

from dbtvenv.compat import repairs


@pytest.mark.parametrize(
    ("distributions", "expected"),
    [
        ([("dbt-core", "1.7.0"), ("protobuf", "5.29.1")], ["protobuf<5"]),
        ([("DBT_Core", "1.5.11"), ("Protobuf", "6.30.0")], ["protobuf<5"]),
        ([("dbt-core", "1.7.20"), ("protobuf", "4.25.3")], []),  # pins protobuf<5 itself
        ([("dbt-core", "1.11.16"), ("protobuf", "6.30.0")], []),
        ([("dbt-core", "1.7.0")], []),
        ([("protobuf", "5.29.1")], []),
        ([("dbt-core", "not a version"), ("protobuf", "5.29.1")], []),
    ],
)
def test_repairs(distributions: list[tuple[str, str]], expected: list[str]) -> None:
    assert [fix.requirement for fix in repairs(distributions)] == expected


def test_a_repair_says_what_and_why() -> None:
    (fix,) = repairs([("dbt-core", "1.7.0"), ("protobuf", "5.29.1")])
    assert fix.reason.startswith("dbt-core 1.7.0 does not work with protobuf 5.29.1: ")
