"""The state store on real SQLite files."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from alembic import command

from dmd.engine import TargetLine
from dmd.state import (
    AsyncStateStore,
    DeviceRecord,
    RecordExists,
    RecordNotFound,
    StateError,
    StateStore,
)
from dmd.state.store import DB_NAME, HEAD_REVISION, _alembic_config

ZERO = [TargetLine(0, 2048, "zero", "")]
KEY = "0123456789abcdef" * 4


def record(name: str, uuid: str | None = None, table: list[TargetLine] = ZERO,
           labels: dict[str, str] | None = None) -> DeviceRecord:
    return DeviceRecord(name, uuid, table, False, 1000, True, labels or {})


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fresh_database_is_wal_with_foreign_keys(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "state")
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert store.schema_revision() == HEAD_REVISION
    con = sqlite3.connect(tmp_path / "state" / DB_NAME)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    with store._engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_device_records_round_trip(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path)
    store.add_device(record("a", "UUID-a", labels={"role": "db"}))
    got = store.get_device("a")
    assert got is not None and got.uuid == "UUID-a" and got.table == ZERO
    assert got.labels == {"role": "db"} and got.owner_uid == 1000 and got.persistent
    store.update_table("a", [TargetLine(0, 8, "error", "")], True)
    store.rename_device("a", "b")
    store.set_labels("b", {"x": "1"})
    store.set_drifted("b", "changed by someone")
    got = store.get_device("b")
    assert got is not None and got.read_only and got.labels == {"x": "1"}
    assert got.drifted == "changed by someone" and store.get_device("a") is None
    store.remove_device("b")
    assert store.list_devices() == []
    with pytest.raises(RecordNotFound):
        store.remove_device("b")


def test_unique_names_and_uuids_change_nothing(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path)
    store.add_device(record("a", "U"))
    with pytest.raises(RecordExists):
        store.add_device(record("a"))
    with pytest.raises(RecordExists):
        store.add_device(record("b", "U"))
    store.add_device(record("c"))
    with pytest.raises(RecordExists):
        store.rename_device("c", "a")
    assert [r.name for r in store.list_devices()] == ["a", "c"]


def test_labels_go_with_their_device(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path)
    store.add_device(record("a", labels={"k": "v"}))
    store.remove_device("a")
    con = sqlite3.connect(tmp_path / DB_NAME)
    assert con.execute("SELECT count(*) FROM labels").fetchone()[0] == 0


def test_keys_are_never_stored(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path)
    crypt = [TargetLine(0, 2048, "crypt", f"aes-xts-plain64 {KEY} 0 7:0 0")]
    keyring = [TargetLine(0, 2048, "crypt", "aes-xts-plain64 :64:logon:dmd:vol 0 7:0 0")]
    integrity = [TargetLine(0, 2048, "integrity", f"7:0 0 32 J 1 internal_hash:hmac(sha256):{KEY}")]
    store.add_device(record("c", table=crypt))
    store.add_device(record("k", table=keyring))
    store.add_device(record("i", table=integrity))
    store.update_table("c", crypt, False)
    c, k, i = (store.get_device(n) for n in "cki")
    assert c is not None and c.key_withheld and c.table[0].params.split()[1] == "-"
    assert k is not None and not k.key_withheld and ":64:logon:dmd:vol" in k.table[0].params
    assert i is not None and i.key_withheld and "internal_hash:hmac(sha256):-" in i.table[0].params
    store.close()
    for path in tmp_path.iterdir():
        assert KEY.encode() not in path.read_bytes(), path


def test_intents_journal(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path)
    first = store.begin_intent("create", "a", {"uuid": None})
    second = store.begin_intent("remove", "b", {})
    store.advance_intent(first, 2)
    store.finish_intent(second, "done")
    pending = store.pending_intents()
    assert [(p.id, p.operation, p.step, p.args) for p in pending] == [
        (first, "create", 2, {"uuid": None})]


def test_an_intent_is_on_disk_before_begin_returns(tmp_path: Path) -> None:
    child = (
        "import os, sys; from pathlib import Path; from dmd.state import StateStore\n"
        "s = StateStore.open(Path(sys.argv[1])); s.begin_intent('reload', 'vol', {})\n"
        "os._exit(1)\n"
    )
    subprocess.run([sys.executable, "-c", child, str(tmp_path)], check=False)
    pending = StateStore.open(tmp_path).pending_intents()
    assert [(p.operation, p.device) for p in pending] == [("reload", "vol")]


def test_upgrade_from_the_first_schema_keeps_records(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{path}")
    config = _alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.exec_driver_sql(
            "INSERT INTO devices (id, name, uuid, table_json, read_only, owner_uid, created_at,"
            " persistent, key_withheld) VALUES (1, 'old', 'U-old', '[[0, 8, \"zero\", \"\"]]',"
            " 0, 0, '2026-01-01 00:00:00', 1, 0)")
        connection.exec_driver_sql("INSERT INTO labels VALUES (1, 'k', 'v')")
        connection.exec_driver_sql(
            "INSERT INTO intents (operation, device, args_json, state, step, created_at)"
            " VALUES ('create', 'old', '{}', 'pending', 1, '2026-01-01 00:00:00')")
    engine.dispose()
    store = StateStore.open(tmp_path)
    assert store.schema_revision() == HEAD_REVISION
    old = store.get_device("old")
    assert old is not None and old.uuid == "U-old" and old.labels == {"k": "v"}
    assert old.table == [TargetLine(0, 8, "zero", "")] and old.drifted is None
    assert [p.device for p in store.pending_intents()] == ["old"]


def test_corrupt_database_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    path.write_bytes(b"this is not sqlite" * 100)
    before = digest(path)
    with pytest.raises(StateError, match=str(path)) as caught:
        StateStore.open(tmp_path)
    assert "move it away" in str(caught.value)
    assert digest(path) == before


def test_newer_schema_is_refused_and_untouched(tmp_path: Path) -> None:
    StateStore.open(tmp_path).close()
    path = tmp_path / DB_NAME
    con = sqlite3.connect(path)
    con.execute("UPDATE alembic_version SET version_num = '9999'")
    con.commit()
    con.close()
    before = digest(path)
    with pytest.raises(StateError, match="newer dmd") as caught:
        StateStore.open(tmp_path)
    assert str(path) in str(caught.value)
    assert digest(path) == before


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    con = sqlite3.connect(tmp_path / DB_NAME)
    con.execute("CREATE TABLE other (x)")
    con.commit()
    con.close()
    with pytest.raises(StateError, match="not a dmd database"):
        StateStore.open(tmp_path)


def test_unusable_state_paths_are_refused(tmp_path: Path) -> None:
    # Tests run as root, which permission bits do not stop: use paths that
    # cannot work for anyone.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StateError, match="cannot create the state directory"):
        StateStore.open(blocker / "state")
    (tmp_path / "dir" / DB_NAME).mkdir(parents=True)
    with pytest.raises(StateError, match="not a file"):
        StateStore.open(tmp_path / "dir")


async def test_async_store_runs_on_one_thread_off_the_loop(tmp_path: Path) -> None:
    store = AsyncStateStore(StateStore.open(tmp_path))
    seen: set[int] = set()
    original = store.sync.add_device

    def spy(rec: DeviceRecord) -> None:
        seen.add(threading.get_ident())
        original(rec)

    store.sync.add_device = spy  # type: ignore[method-assign]
    await asyncio.gather(*(store.add_device(record(f"d{i}")) for i in range(20)))
    assert len(seen) == 1 and threading.get_ident() not in seen
    assert len(await store.list_devices()) == 20
    store.close()


async def test_a_progress_mark_goes_with_the_next_write(tmp_path: Path) -> None:
    """A mark queued with advance_intent_soon starts no transaction: it is
    committed with the next write queued after it, before it, in order."""
    store = AsyncStateStore(StateStore.open(tmp_path))
    intent = await store.begin_intent("create", "a", {})
    before = store.commits
    mark = store.advance_intent_soon(intent, 3)
    await asyncio.sleep(0.1)
    assert not mark.done() and store.commits == before
    assert [i.step for i in await store.pending_intents()] == [0]
    await store.add_device(record("a"))
    assert mark.done() and store.commits == before + 1
    assert [i.step for i in await store.pending_intents()] == [3]
    store.close()


async def test_concurrent_writes_share_commits(tmp_path: Path) -> None:
    """Group commit: 64 operations at once take a handful of transactions,
    each caller learns its own outcome, and one refused write spoils no other."""
    store = AsyncStateStore(StateStore.open(tmp_path))
    await store.add_device(record("taken"))
    before = store.commits
    names = [f"g{i}" for i in range(63)] + ["taken"]
    outcomes = await asyncio.gather(*(store.add_device(record(n)) for n in names),
                                    return_exceptions=True)
    ids = await asyncio.gather(*(store.begin_intent("create", n, {}) for n in names))
    assert isinstance(outcomes[-1], RecordExists)
    assert all(o is None for o in outcomes[:-1])
    assert len(set(ids)) == 64
    assert store.commits - before <= 8, store.commits - before  # not 128
    store.close()
    # Committed and durable: a fresh open sees all of it.
    again = StateStore.open(tmp_path)
    assert len(again.list_devices()) == 64
    assert len(again.pending_intents()) == 64
    again.close()


async def test_a_write_returns_only_once_committed(tmp_path: Path) -> None:
    store = AsyncStateStore(StateStore.open(tmp_path))
    intent = await store.begin_intent("create", "x", {})
    # Read through another connection, as recovery after a crash would.
    other = StateStore.open(tmp_path)
    assert [i.id for i in other.pending_intents()] == [intent]
    other.close()
    store.close()


def _schema(path: Path) -> dict[str, object]:
    """Every table's columns, indexes and foreign keys, as SQLite reports them."""
    con = sqlite3.connect(path)
    try:
        tables = [name for (name,) in con.execute(
            "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        schema: dict[str, object] = {}
        for table in tables:
            indexes = sorted(
                (unique, [column for _, _, column in con.execute(f"PRAGMA index_info('{name}')")])
                for _, name, unique, *_ in con.execute(f"PRAGMA index_list('{table}')"))
            schema[table] = {
                "columns": [row[1:] for row in con.execute(f"PRAGMA table_info('{table}')")],
                "indexes": indexes,
                "foreign_keys": [row[2:] for row in con.execute(
                    f"PRAGMA foreign_key_list('{table}')")],
            }
        return schema
    finally:
        con.close()


def test_head_revision_is_the_newest_migration(tmp_path: Path) -> None:
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine

    from dmd.state.store import HEAD_REVISION

    config = _alembic_config(create_engine(f"sqlite:///{tmp_path / 'x'}"))
    assert ScriptDirectory.from_config(config).get_current_head() == HEAD_REVISION


def test_a_new_database_has_the_schema_the_migrations_make(tmp_path: Path) -> None:
    from sqlalchemy import create_engine

    StateStore.open(tmp_path / "new").close()
    migrated = tmp_path / "migrated" / DB_NAME
    migrated.parent.mkdir()
    engine = create_engine(f"sqlite:///{migrated}")
    config = _alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    engine.dispose()
    made = _schema(tmp_path / "new" / DB_NAME)
    assert set(made) == {"alembic_version", "devices", "intents", "labels", "pools", "volumes"}
    assert made == _schema(migrated)
    store = StateStore.open(migrated.parent)
    assert store.schema_revision() == HEAD_REVISION
    store.add_device(record("a", "U-a", labels={"k": "v"}))
    assert store.get_device("a") is not None


def test_start_killed_while_creating_the_database_leaves_it_usable(tmp_path: Path) -> None:
    child = (
        "import os, sys\n"
        "from sqlalchemy import Engine, event\n"
        "from dmd.state import StateStore\n"
        "@event.listens_for(Engine, 'after_cursor_execute')\n"
        "def die(conn, cursor, statement, *rest):\n"
        "    if statement.lstrip().startswith('CREATE TABLE labels'):\n"
        "        os._exit(9)\n"
        "StateStore.open(sys.argv[1])\n"
    )
    killed = subprocess.run([sys.executable, "-c", child, str(tmp_path)], check=False)
    assert killed.returncode == 9
    store = StateStore.open(tmp_path)
    assert store.schema_revision() == HEAD_REVISION
    store.add_device(record("a"))
    assert [d.name for d in store.list_devices()] == ["a"]


def imported(tmp_path: Path, code: str, prefix: str) -> list[str]:
    """The modules named *prefix* or under it that a fresh interpreter has
    imported after *code* (``sys.argv[1]`` is *tmp_path*)."""
    child = (f"import sys\n{code}\n"
             f"print('\\n'.join(sorted(m for m in sys.modules "
             f"if m == {prefix!r} or m.startswith({prefix + '.'!r}))))\n")
    done = subprocess.run([sys.executable, "-c", child, str(tmp_path)], check=True,
                          capture_output=True, text=True)
    return done.stdout.split()


def test_opening_a_current_or_new_database_does_not_import_alembic(tmp_path: Path) -> None:
    assert imported(tmp_path, "from dmd.state import StateStore\n"
                              "StateStore.open(sys.argv[1]).close()\n"
                              "StateStore.open(sys.argv[1]).close()", "alembic") == []


def test_dmd_starts_without_the_orm(tmp_path: Path) -> None:
    """The store works on SQLAlchemy Core tables: the ORM, about a seventh
    of dmd's start, is never imported (by the daemon or by opening its state)."""
    assert imported(tmp_path, "import dmd.daemon\nfrom dmd.state import StateStore\n"
                              "StateStore.open(sys.argv[1]).close()", "sqlalchemy.orm") == []
