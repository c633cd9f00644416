"""The quick check of the common case must agree with the checks that explain a refusal."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.receivers.validation import (
    OPTIONAL_IDS,
    Rejection,
    _explain,
    _plainly_valid,
    validate_interaction,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.sampled_from(["", " ", "\t\n", "a", "agent"]),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=2),
    max_leaves=4,
)
FIELDS = ["agentId", "prompt", "response", *OPTIONAL_IDS, "metadata", "toolCalls", "other"]
interactions = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=len(FIELDS))


def explains(item: Any) -> bool:
    try:
        _explain(item, None)
    except Rejection:
        return False
    return True


@settings(max_examples=3000, database=None, deadline=None)
@given(interactions | json_values)
def test_the_quick_check_accepts_exactly_what_the_full_checks_accept(item: Any) -> None:
    # As received: through orjson, which yields exact types only.
    item = orjson.loads(orjson.dumps(item))
    assert _plainly_valid(item) == explains(item)


def test_the_quick_check_takes_the_seed_event_and_refuses_bool_ids() -> None:
    event = {"agentId": "a", "prompt": "p", "response": {"text": "r"}, "appId": 7,
             "metadata": {}, "toolCalls": [], "sessionId": None}
    assert validate_interaction(event) is event
    for field, value in (("appId", True), ("agentId", "  "), ("prompt", 3), ("toolCalls", {})):
        assert not _plainly_valid({**event, field: value}), field


def test_an_id_of_a_wrong_type_is_told_what_is_accepted() -> None:
    """Integers are accepted, as upstream does; the message said only "a string"."""
    try:
        validate_interaction({"agentId": "a", "prompt": "p", "response": "r", "userId": 1.5})
    except Rejection as e:
        assert (e.status, e.message) == (400, "userId must be a string (or an integer), got number")
    else:
        raise AssertionError("accepted")
