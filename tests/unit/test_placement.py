"""Placement over simulated fleets (agentvm.common.placement), as E2B tests its own:
capacity, skew, failures, a fleet filling up, warm nodes, pool splits."""

from __future__ import annotations

import dataclasses
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentvm.common.errors import ResourceExhausted
from agentvm.common.placement import Amount, Node, Want, choose, eligible, split

STD = Amount(1, 512, 4096)
STD_WANT = Want(STD)


def fleet(n: int, rng: random.Random, *, skew: bool = False) -> list[Node]:
    nodes = []
    for i in range(n):
        big = skew and i % 10 == 0
        nodes.append(
            Node(
                id=f"n{i:02d}",
                allocatable=Amount(
                    64 if big else rng.choice((8, 16, 32)),
                    (256 if big else rng.choice((32, 64, 128))) * 1024,
                    2_000_000,
                ),
                cpu_overcommit=2.0,
                labels={"zone": "abc"[i % 3]},
                accelerator="kvm" if i % 5 else "tcg",
            )
        )
    return nodes


def place(nodes: list[Node], want: Want, rng: random.Random) -> str:
    """Place one VM as a caller would (first candidate takes it); return its node."""
    target = choose(nodes, want, rng)[0]
    i = next(k for k, n in enumerate(nodes) if n.id == target.id)
    nodes[i] = dataclasses.replace(target, committed=target.committed + want.size)
    return target.id


def test_sixty_nodes_stay_balanced_and_never_over_capacity() -> None:
    rng = random.Random(7)
    nodes = fleet(60, rng)
    for _ in range(1500):
        place(nodes, STD_WANT, rng)
    loads = [n.load() for n in nodes]
    assert all(n.fits(Amount()) for n in nodes)  # nothing past its limits
    # Power of three choices: the spread stays narrow (uniform random would not).
    assert max(loads) - min(loads) < 0.25, (min(loads), max(loads))
    assert statistics.pstdev(loads) < 0.06


def test_a_big_node_takes_its_share_of_a_skewed_fleet() -> None:
    rng = random.Random(11)
    nodes = fleet(50, rng, skew=True)
    placed: dict[str, int] = {}
    for _ in range(1200):
        nid = place(nodes, STD_WANT, rng)
        placed[nid] = placed.get(nid, 0) + 1
    big = [n.id for n in nodes if n.allocatable.vcpus == 64]
    small = [n.id for n in nodes if n.allocatable.vcpus == 8]
    assert min(placed.get(b, 0) for b in big) > max(placed.get(s, 0) for s in small)


def test_failed_nodes_get_nothing_and_the_rest_absorb_it() -> None:
    rng = random.Random(3)
    nodes = fleet(55, rng)
    for _ in range(300):
        place(nodes, STD_WANT, rng)
    down = {n.id for n in nodes[:10]}
    before = {n.id: n.committed for n in nodes}
    nodes = [dataclasses.replace(n, healthy=n.id not in down) for n in nodes]
    for _ in range(300):
        assert place(nodes, STD_WANT, rng) not in down
    assert all(n.committed == before[n.id] for n in nodes if n.id in down)


def test_a_full_fleet_refuses_only_when_no_node_has_room() -> None:
    rng = random.Random(5)
    nodes = [Node(id=f"n{i}", allocatable=Amount(4, 4096, 100_000)) for i in range(50)]
    for _ in range(50 * 4):  # vCPUs bind first: 4 per node (memory would take 8)
        place(nodes, STD_WANT, rng)
    assert all(n.committed.vcpus == 4 for n in nodes)  # every node filled before a refusal
    with pytest.raises(ResourceExhausted, match="no healthy node has room") as err:
        place(nodes, STD_WANT, rng)
    assert "1 vCPUs, 512 MiB" in err.value.message


def test_labels_accelerator_and_health_filter_and_the_refusal_says_which() -> None:
    rng = random.Random(1)
    nodes = fleet(60, rng)
    want = Want(STD, labels={"zone": "b"}, accelerator="tcg")
    for _ in range(50):
        for n in choose(nodes, want, rng):
            assert n.labels["zone"] == "b"
            assert n.accelerator == "tcg"
    with pytest.raises(ResourceExhausted, match=r"no healthy node has labels \[zone=z\]"):
        choose(nodes, Want(STD, labels={"zone": "z"}), rng)
    with pytest.raises(ResourceExhausted, match="none of the 60 nodes answers"):
        choose([dataclasses.replace(n, healthy=False) for n in nodes], STD_WANT, rng)
    with pytest.raises(ResourceExhausted, match="no nodes are known"):
        choose([], STD_WANT, rng)


def test_a_warm_or_templated_node_wins_unless_much_busier() -> None:
    rng = random.Random(2)
    plain = [Node(id=f"p{i}", allocatable=Amount(16, 16384, 10**6)) for i in range(2)]
    warm = Node(
        id="warm",
        allocatable=Amount(16, 16384, 10**6),
        committed=Amount(3, 3072, 0),
        warm={"standard": 2},
    )
    want = dataclasses.replace(STD_WANT, pool_key="standard")
    assert choose([*plain, warm], want, rng)[0].id == "warm"
    busy = dataclasses.replace(warm, committed=Amount(15, 15360, 0))
    assert choose([*plain, busy], want, rng)[0].id != "warm"
    tpl = dataclasses.replace(
        plain[0], id="tpl", committed=Amount(2, 2048, 0), templates=frozenset({"k"})
    )
    assert (
        choose([plain[1], tpl], dataclasses.replace(STD_WANT, template_key="k"), rng)[0].id == "tpl"
    )


def test_the_same_seed_gives_the_same_choices() -> None:
    def run() -> list[str]:
        rng = random.Random(42)
        nodes = fleet(52, random.Random(0))
        return [place(nodes, STD_WANT, rng) for _ in range(200)]

    assert run() == run()


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(0, 500),
    rooms=st.lists(
        st.tuples(st.integers(0, 64), st.integers(0, 128), st.booleans()), min_size=0, max_size=60
    ),
)
def test_split_never_exceeds_room_and_places_what_fits(
    total: int, rooms: list[tuple[int, int, bool]]
) -> None:
    nodes = [
        Node(id=f"n{i}", allocatable=Amount(v, g * 1024, 10**7), healthy=h)
        for i, (v, g, h) in enumerate(rooms)
    ]
    out = split(total, nodes, STD)
    fits = {
        n.id: min(int(n.allocatable.vcpus), int(n.allocatable.memory_mib // 512))
        for n in nodes
        if n.healthy
    }
    assert all(0 < c <= fits[k] for k, c in out.items())
    assert sum(out.values()) == min(total, sum(fits.values()))


def test_split_follows_free_room() -> None:
    nodes = [
        Node(id="a", allocatable=Amount(30, 30 * 512, 10**7)),
        Node(id="b", allocatable=Amount(10, 10 * 512, 10**7)),
        Node(id="c", allocatable=Amount(10, 10 * 512, 10**7), committed=Amount(10, 5120, 0)),
    ]
    assert split(8, nodes, STD) == {"a": 6, "b": 2}


def test_eligible_counts_overcommit() -> None:
    n = Node(id="n", allocatable=Amount(2, 4096, 10**6), committed=Amount(3, 1024, 0))
    assert not eligible(n, STD_WANT)
    assert eligible(dataclasses.replace(n, cpu_overcommit=2.0), STD_WANT)
