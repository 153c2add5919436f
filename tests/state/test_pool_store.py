"""The store's records of pools and volumes: every kind of change shows in
the next read of a pool's volumes (they are served from memory while the
pool's UUID and generation say nothing changed)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dmd.state import PoolLayout, PoolRecord, Segment, StateStore, VolumeRecord

LAYOUT = PoolLayout(("/dev/a",), (1 << 30,), (Segment(0, 8192, 4096),),
                    (Segment(0, 12288, 1 << 20),), ("dev-a",))


def pool(name: str = "tank", uuid: str = "P-1", generation: int = 0) -> PoolRecord:
    return PoolRecord(name, uuid, 0, 128, "queue", 20, 0, 0, LAYOUT, generation=generation)


def volume(name: str, thin_id: int, pool_name: str = "tank") -> VolumeRecord:
    return VolumeRecord(f"V-{name}", pool_name, name, thin_id, 1 << 20, None, 0)


def names(store: StateStore, pool_name: str = "tank") -> list[str]:
    return [v.name for v in store.list_volumes(pool_name)]


def test_every_change_of_a_pools_volumes_shows_in_the_next_read(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path)
    store.add_pool(pool())
    assert names(store) == []
    store.pool_change("tank", transaction_id=1, next_thin_id=1, add=volume("a", 0))
    assert names(store) == ["a"]
    store.pool_change("tank", transaction_id=2, next_thin_id=2, add=volume("b", 1))
    assert names(store) == names(store) == ["a", "b"]
    store.pool_change("tank", update=replace(volume("a", 0), name="a2", active=False))
    found = store.list_volumes("tank")
    assert [(v.name, v.active) for v in found] == [("a2", False), ("b", True)]
    found.clear()  # a caller's list is its own
    assert store.list_volumes("tank") == StateStore.open(tmp_path).list_volumes("tank")
    assert names(store) == ["a2", "b"]
    store.pool_change("tank", transaction_id=3, remove="V-b")
    assert names(store) == ["a2"]
    # The devices' records win, at the generation they carry (even the same one).
    generation = store.get_pool("tank").generation  # type: ignore[union-attr]
    store.replace_pool(pool(generation=generation), [volume("c", 5)])
    assert names(store) == ["c"]
    store.pool_change("tank", remove="V-c")  # a pool goes once its volumes are gone
    store.remove_pool("tank")
    assert names(store) == []
    # The same name again, a different pool at the generation the old one had.
    store.import_pool(pool(uuid="P-2", generation=generation), [volume("d", 0)])
    assert names(store) == ["d"]
    store.add_pool(pool("other", "P-3"))
    store.pool_change("other", add=volume("e", 0, "other"))
    assert names(store) == ["d"] and names(store, "other") == ["e"]
    assert [v.name for v in store.list_volumes()] == ["d", "e"]
    # A second store on the file (another dmd after this one) reads the same.
    again = StateStore.open(tmp_path)
    assert names(again) == ["d"]
