import pytest
from hypothesis import given
from hypothesis import strategies as st

from qagent.arch import FC, GAP, Conv, Pool, Softmax, canonical, format_architecture, parse_architecture
from qagent.errors import ArchitectureSyntaxError


def test_round_trip_and_canonical_spelling():
    text = "[C(64,3,1), P(2,2), FC(512), SM(10)]"
    layers = parse_architecture(text)
    assert layers == (Conv(64, 3, 1), Pool(2, 2), FC(512), Softmax(10))
    assert format_architecture(layers) == text
    assert canonical(" [ C( 64 , 3,1 ),P(2,2) ,FC(512),  SM(10) ] ") == text
    assert parse_architecture("[C(64,3,1), GAP, SM(10)]")[-2:] == (GAP(), Softmax(10))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("C(64,3,1), SM(10)", "bracketed list"),
        ("[C(64,3), SM(10)]", "C takes 3 integer parameter(s), got 2 in token 'C(64,3)' at column 2"),
        ("[C(64,3,1), X(2), SM(10)]", "unknown layer 'X' in token 'X(2)' at column 13"),
        ("[C(64,a,1), SM(10)]", "non-integer parameter in token 'C(64,a,1)' at column 2"),
        ("[C(64,3,1), SM(10),]", "trailing ','"),
        ("[C(64,3,1) P(2,2), SM(10)]", "expected ','"),
        ("[C(64,3,1)]", "must end with SM(n)"),
        ("[SM(10), C(64,3,1), SM(10)]", "SM may only be the last layer"),
        ("[GAP, C(64,3,1), SM(10)]", "GAP must be directly followed by SM"),
        ("[C(0,3,1), SM(10)]", "must be positive"),
        ("[GAP(3), SM(10)]", "GAP takes 0"),
        ("[]", "empty architecture"),
    ],
)
def test_malformed_strings_point_at_the_token(text, fragment):
    with pytest.raises(ArchitectureSyntaxError) as info:
        parse_architecture(text)
    assert fragment in str(info.value)


positive = st.integers(min_value=1, max_value=1024)
hidden = st.one_of(
    st.builds(Conv, positive, positive, positive), st.builds(Pool, positive, positive), st.builds(FC, positive)
)


@given(st.lists(hidden, max_size=20), st.booleans(), positive)
def test_any_layer_list_round_trips(layers, gap, classes):
    arch = (*layers, *((GAP(),) if gap else ()), Softmax(classes))
    text = format_architecture(arch)
    assert parse_architecture(text) == arch
    assert format_architecture(parse_architecture(text)) == text
