"""Hypothesis strategies for nodes, shared by the property and fuzz tests.

Nodes are generated as neutral trees (tag, attrs, content) and built with a
given implementation's Node class by ``build``.
"""

from hypothesis import strategies as st

from pigeon.core.tokens import LATEST

TOKENS = sorted(LATEST.codes)

# Built from integers and digit text: far faster to generate than from_regex.
phones = st.integers(10**7, 10**15 - 1).map(str)
devices = st.builds(lambda p, d: f"{p}:{d}", phones, st.integers(0, 255))
groups = st.text("0123456789", min_size=1, max_size=20).map(lambda d: "g:" + d)
# Look like addresses but are not: must travel (and come back) as literal strings.
near_addresses = st.one_of(
    st.builds(lambda p, d: f"{p}:{d}", phones, st.integers(256, 999)),
    st.builds(lambda p, d: f"{p}:0{d}", phones, st.integers(0, 99)),
    st.builds(lambda d: f"0123456789:{d}", st.integers(0, 255)),
    st.text("0123456789", min_size=21, max_size=25).map(lambda d: "g:" + d),
    st.just("g:"),
    st.builds(lambda p, d: f"{p}:{d}", st.integers(1000, 9999999), st.integers(0, 9)),
)
strings = st.one_of(
    st.sampled_from(TOKENS),
    st.text(max_size=24),
    st.text("0123456789", min_size=1, max_size=30),
    st.text("0123456789abcdef", min_size=0, max_size=300),
    phones,
    devices,
    groups,
    near_addresses,
)
names = st.one_of(st.sampled_from(TOKENS), st.text(min_size=1, max_size=12), devices)

leaf_content = st.one_of(st.none(), st.binary(max_size=300))


def trees(max_leaves=12):
    leaf = st.tuples(names, st.dictionaries(names, strings, max_size=6), leaf_content)
    return st.recursive(
        leaf,
        lambda kids: st.tuples(
            names, st.dictionaries(names, strings, max_size=6), st.lists(kids, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def build(node_cls, tree):
    tag, attrs, content = tree
    if isinstance(content, list):
        content = [build(node_cls, t) for t in content]
    return node_cls(tag, dict(attrs), content)
