"""containerd's filter syntax as `fusesnap list` understands it (parser and matching, no store)."""

import pytest

from fusesnap.errors import InvalidInput
from fusesnap.snapshots.filters import info_adaptor, match_any, parse_filter, parse_filters

GC = "containerd.io/gc.root"

# The snapshots of containerd's checkWalk: name -> (kind, parent, labels)
WALK = {
    "a-np": ("active", "", {GC: "check-walk"}),
    "p": ("committed", "", {GC: "check-walk"}),
    "a": ("active", "p", {GC: "check-walk"}),
    "v": ("view", "p", {GC: "check-walk"}),
    "p-wl": ("committed", "", {"l": "1", GC: "check-walk"}),
    "a-wl": ("active", "p-wl", {"l": "2", GC: "check-walk"}),
    "v-wl": ("view", "p-wl", {"l": "3", GC: "check-walk"}),
    "a-np-wl": ("active", "", {"l": "2", GC: "check-walk"}),
    "other": ("committed", "", {}),
}


def select(*filters: str) -> list[str]:
    parsed = parse_filters(filters)
    out = []
    for name, (kind, parent, labels) in WALK.items():
        if match_any(parsed, info_adaptor({"name": name, "kind": kind, "parent": parent}, labels)):
            out.append(name)
    return sorted(out)


@pytest.mark.parametrize(
    "filters,expected",
    [
        (['labels."containerd.io/gc.root"==check-walk'], ["a", "a-np", "a-np-wl", "a-wl", "p", "p-wl", "v", "v-wl"]),
        (['kind==active,labels."containerd.io/gc.root"==check-walk'], ["a", "a-np", "a-np-wl", "a-wl"]),
        (['kind==view,labels."containerd.io/gc.root"==check-walk'], ["v", "v-wl"]),
        (['kind==committed,labels."containerd.io/gc.root"==check-walk'], ["p", "p-wl"]),
        (["name==p", "name==a-np-wl"], ["a-np-wl", "p"]),
        (["name==a-wl,labels.l"], ["a-wl"]),
        (["parent==p"], ["a", "v"]),
        (['parent!="",labels."containerd.io/gc.root"==check-walk'], ["a", "a-wl", "v", "v-wl"]),
        (["labels.l"], ["a-np-wl", "a-wl", "p-wl", "v-wl"]),
        (["labels.l==2"], ["a-np-wl", "a-wl"]),
    ],
)
def test_containerd_walk_cases(filters, expected):
    assert select(*filters) == expected


def test_no_filter_matches_everything():
    assert select() == sorted(WALK)


def test_regex_and_not_equal():
    assert select("name~=^a-") == ["a-np", "a-np-wl", "a-wl"]
    assert select("name~=/^p(-wl)?$/") == ["p", "p-wl"]
    assert select("kind!=active,kind!=view") == ["other", "p", "p-wl"]
    assert select("labels.l!=2,labels.l") == ["p-wl", "v-wl"]


def test_quoted_value_with_comma_and_escapes():
    f = parse_filter('labels.x=="a,b\\"c"')
    assert f.selectors[0].value == 'a,b"c'
    assert f.selectors[0].fieldpath == ("labels", "x")


@pytest.mark.parametrize("bad", ['labels."unterminated', "name==", "kind=active", "==x", "name~=(", "a b"])
def test_malformed_filters_are_rejected_with_a_reason(bad):
    if bad == "name==":
        # An empty value is legal: it matches an empty field.
        assert parse_filter(bad).selectors[0].value == ""
        return
    with pytest.raises(InvalidInput, match="invalid filter"):
        parse_filter(bad)
