"""What schemathesis sends the billing API beyond what the schema describes, loaded by
`tests/test_schemathesis.py` through `SCHEMATHESIS_HOOKS`.

Schema-driven strings rarely hold the values that broke the API: a NUL (which Postgres text
cannot store) or another control character, a month or an instant at the edge of what a
datetime holds, a cursor forged from such parts. Half of the generated cases go out as
generated; in the other half every string may carry one of those.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import schemathesis
from hypothesis import strategies as st

# NUL half of the time: it is the one Postgres refuses outright.
CONTROL_CHARACTERS = st.one_of(
    st.just("\x00"), st.sampled_from(["\x01", "\t", "\n", "\r", "\x1b", "\x7f", "\x85"])
)
EDGE_MONTHS = st.sampled_from(["0000-01", "1969-12", "9999-12"])
EDGE_INSTANTS = st.sampled_from(
    [
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00+01:00",
        "1969-12-31T23:59:59Z",
        "9999-12-31T23:59:59.999999Z",
        "9999-12-31T23:59:59-01:00",
    ]
)
MONTH = re.compile(r"^\d{4}-\d{2}$")
INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T")


def with_control_character(text: str) -> st.SearchStrategy[str]:
    return st.tuples(st.integers(0, len(text)), CONTROL_CHARACTERS).map(
        lambda cut: text[: cut[0]] + cut[1] + text[cut[0] :]
    )


def forged_cursor() -> st.SearchStrategy[str]:
    """A cursor of the right shape (base64 of a JSON list) whose parts are edge values."""
    part = st.one_of(
        EDGE_INSTANTS, st.text(max_size=8).flatmap(with_control_character), st.uuids().map(str)
    )
    return st.lists(part, min_size=2, max_size=2).map(
        lambda key: base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")
    )


def odd(value: Any, name: str | None = None) -> st.SearchStrategy[Any]:
    """`value`, or with any of its strings swapped for one of the values above."""
    if isinstance(value, str):
        options = [with_control_character(value)]
        if name == "cursor":
            options.append(forged_cursor())
        if MONTH.match(value):
            options.append(EDGE_MONTHS)
        if INSTANT.match(value):
            options.append(EDGE_INSTANTS)
        return st.one_of(st.just(value), *options)
    if isinstance(value, dict):
        return st.fixed_dictionaries({k: odd(v, k) for k, v in value.items()})
    if isinstance(value, list):
        return st.tuples(*(odd(item) for item in value)).map(list)
    return st.just(value)


def half_odd(value: Any) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(value), odd(value)) if value else st.just(value)


@schemathesis.hook
def flatmap_query(context: Any, query: Any) -> st.SearchStrategy[Any]:
    return half_odd(query)


@schemathesis.hook
def flatmap_path_parameters(context: Any, path_parameters: Any) -> st.SearchStrategy[Any]:
    return half_odd(path_parameters)


@schemathesis.hook
def flatmap_body(context: Any, body: Any) -> st.SearchStrategy[Any]:
    return half_odd(body)


@schemathesis.check
def documented_error_code(ctx: Any, response: Any, case: Any) -> None:
    """An error answers with a code its operation documents for that status (service/errors.py
    makes each operation's entries from the error classes it declares)."""
    if response.status_code < 400:
        return
    entry = case.operation.definition.raw.get("responses", {}).get(str(response.status_code))
    if entry is None:
        return  # an undocumented status: `status_code_conformance` reports it
    examples = entry.get("content", {}).get("application/json", {}).get("examples", {})
    codes = {example["value"]["error"]["code"] for example in examples.values()}
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        # Not the error shape: a finding of its own, reported as a failure with the body.
        raise AssertionError(
            f"{response.status_code} is not in the error shape: {response.text[:300]!r}"
        ) from None
    if code not in codes:
        raise AssertionError(
            f"{response.status_code} `{code}` is not documented for this operation: {sorted(codes)}"
        )
