"""The state store: SQLite through SQLAlchemy, one writer thread.

``StateStore`` is synchronous; ``AsyncStateStore`` runs every call of it on one
dedicated thread, so the event loop never waits on SQLite and writes are
serialized without SQLite's own locking having to arbitrate. Every commit is
durable (WAL with ``synchronous=FULL``): an intent is on disk before the
kernel is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Engine, Row, create_engine, delete, event, insert, select, update
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError

from dmd.engine import TargetLine
from dmd.state import models as tables
from dmd.state.errors import RecordExists, RecordNotFound, StateError
from dmd.state.pool_records import (
    PoolLayout,
    PoolRecord,
    VolumeRecord,
    pool_record,
    volume_record,
    volume_values,
)
from dmd.state.redact import redact_table

if TYPE_CHECKING:
    from alembic.config import Config

DB_NAME = "dmd.sqlite3"
MIGRATIONS = Path(__file__).parent / "migrations"
# The newest revision in migrations/versions (a test keeps the two in step). A
# database already there, or a new one, is opened without importing Alembic:
# that import alone cost several seconds of every start in the lab VM.
HEAD_REVISION = "0010"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A device dmd manages. The service layer hands the first seven fields
    to add_device; the store sets the others (when, whether a key was
    withheld, drift)."""

    name: str
    uuid: str | None
    table: list[TargetLine]
    read_only: bool
    owner_uid: int
    persistent: bool
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    key_withheld: bool = False
    drifted: str | None = None


@dataclass(frozen=True, slots=True)
class IntentRecord:
    id: int
    operation: str
    device: str
    args: dict[str, Any]
    state: str
    step: int
    created_at: datetime
    finished_at: datetime | None


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _sql_time(moment: datetime) -> str:
    """A time as SQLAlchemy writes a DateTime into SQLite, for raw statements."""
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


def _sql_now() -> str:
    return _sql_time(_now())


def _table_json(table: Sequence[Sequence[object]]) -> str:
    return json.dumps([list(line) for line in table])


def _table(raw: str) -> list[TargetLine]:
    return [TargetLine(int(s), int(n), str(t), str(p)) for s, n, t, p in json.loads(raw)]


def _device(row: Row[Any], labels: dict[str, str]) -> DeviceRecord:
    return DeviceRecord(
        name=row.name, uuid=row.uuid, table=_table(row.table_json), read_only=row.read_only,
        owner_uid=row.owner_uid, persistent=row.persistent, labels=labels,
        created_at=row.created_at, key_withheld=row.key_withheld, drifted=row.drifted,
    )


def _intent(row: Row[Any]) -> IntentRecord:
    return IntentRecord(row.id, row.operation, row.device, json.loads(row.args_json),
                        row.state, row.step, row.created_at, row.finished_at)


def _alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def _current_revision(connection: Connection) -> str | None:
    if not connection.exec_driver_sql(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='alembic_version'"
    ).scalar():
        return None
    revision = connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    return None if revision is None else str(revision)


class StateStore:
    """dmd's records in one SQLite file."""

    def __init__(self, path: Path, engine: Engine) -> None:
        self.path = path
        self._engine = engine
        # Inside batch(): the one transaction every write joins, and what the
        # caches below learn once it is committed.
        self._batch: Connection | None = None
        self._batch_learnt: list[Callable[[], None]] = []
        # Caches of the devices table, for the reads every operation makes
        # ("is this name managed?", the record of the device just changed):
        # the names of all records, and the records read since they last
        # changed. Only this store writes the file (dmd locks its state
        # directory), and every write says what it changed (_learn).
        self._names: set[str] | None = None
        self._records: dict[str, DeviceRecord] = {}
        # Each pool's volumes as last read, under the pool's UUID and
        # generation then: every write of a pool's volumes moves or sets its
        # generation, so a read whose pool shows the same pair is served from
        # here (an operation reads them twice or more, 1,000 rows each in a
        # large pool) at the cost of one row's read.
        self._volumes: dict[str, tuple[tuple[str, int], list[VolumeRecord]]] = {}

    # -- opening -----------------------------------------------------------
    @classmethod
    def open(cls, state_dir: Path) -> StateStore:
        """Open (or create) ``state_dir/dmd.sqlite3`` and bring its schema up to date.

        Refuses, with a message naming the file, a database that is corrupt,
        from a newer dmd, or not writable; never overwrites or recreates one.
        """
        state_dir = Path(state_dir)
        path = state_dir / DB_NAME
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create the state directory {state_dir}: {exc.strerror}; "
                             "choose another with --state-dir") from None
        if path.exists() and not path.is_file():
            raise StateError(f"{path} is not a file; move it away or choose another --state-dir")
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise StateError(f"{path} is not readable and writable by this user; "
                             "fix its permissions or run dmd as its owner")
        engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 30})
        event.listen(engine, "connect", _configure_connection)
        try:
            cls._migrate(path, engine)
        except StateError:
            engine.dispose()
            raise
        except (DatabaseError, sqlite3.DatabaseError) as exc:
            engine.dispose()
            reason = str(getattr(exc, "orig", exc))
            if "readonly" in reason or "read-only" in reason:
                raise StateError(f"{path} is not writable ({reason}); check the file system "
                                 "and permissions, or choose another --state-dir") from None
            raise StateError(f"{path} is not a usable dmd database ({reason}); dmd will not "
                             "touch it: restore it from a backup or move it away to start "
                             "with an empty state") from None
        return cls(path, engine)

    @staticmethod
    def _migrate(path: Path, engine: Engine) -> None:
        with engine.connect() as connection:
            current = _current_revision(connection)
            if current is None and connection.exec_driver_sql(
                    "SELECT count(*) FROM sqlite_master WHERE type='table'").scalar():
                raise StateError(f"{path} holds tables but no dmd schema version; it is not "
                                 "a dmd database: move it away or choose another --state-dir")
        if current is None:
            StateStore._create_schema(engine)
        elif current != HEAD_REVISION:
            StateStore._upgrade(path, engine, current)
        with engine.begin() as connection:  # proves the file is writable now, not later
            connection.exec_driver_sql("PRAGMA user_version = 1")

    @staticmethod
    def _create_schema(engine: Engine) -> None:
        """Make the newest schema in one transaction, stamped with its revision
        (Alembic's "create_all, then stamp"): a start killed half-way leaves an
        empty file, not tables without a version that dmd would then refuse."""
        with engine.connect() as connection:
            # pysqlite would run the CREATEs outside any transaction.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
            tables.metadata.create_all(connection)
            connection.exec_driver_sql(
                "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))")
            connection.exec_driver_sql(
                "INSERT INTO alembic_version (version_num) VALUES (?)", (HEAD_REVISION,))
            connection.commit()

    @staticmethod
    def _upgrade(path: Path, engine: Engine, current: str) -> None:
        from alembic import command
        from alembic.script import ScriptDirectory

        config = _alembic_config(engine)
        script = ScriptDirectory.from_config(config)
        if current not in {rev.revision for rev in script.walk_revisions()}:
            raise StateError(f"{path} was written by a newer dmd (schema {current}); run that "
                             "version, or restore a backup made before the upgrade")
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self._engine.dispose()

    def schema_revision(self) -> str | None:
        with self._engine.connect() as connection:
            return _current_revision(connection)

    @contextlib.contextmanager
    def batch(self, durable: bool) -> Iterator[None]:
        """One transaction for every write made inside (group commit): each
        write runs in a savepoint of its own, so one that fails (a name
        recorded already) undoes only itself, and all of them are committed,
        with one fsync if *durable*, when the block ends. Nothing is visible
        to readers, or durable, before that."""
        assert self._batch is None, "batches do not nest"
        with self._engine.connect() as connection:
            connection.exec_driver_sql(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._batch = connection
            try:
                yield
                connection.commit()
                for learn in self._batch_learnt:
                    learn()
            finally:
                self._batch = None
                self._batch_learnt = []

    def _learn(self, *names: str, added: str | None = None, removed: str | None = None,
               record: DeviceRecord | None = None) -> None:
        """After a committed write: forget the cached records of *names* (or
        keep *record*, the one just written), and keep the set of names up
        to date."""
        def learn() -> None:
            for name in names:
                self._records.pop(name, None)
            if record is not None:
                self._records[record.name] = record
            if self._names is not None:
                if removed is not None:
                    self._names.discard(removed)
                if added is not None:
                    self._names.add(added)

        if self._batch is not None:
            self._batch_learnt.append(learn)
        else:
            learn()

    def _known_names(self) -> set[str]:
        if self._names is None:
            # Every record at once: start-up asks for each device's (recovery,
            # the first inventory), one query each was a second at 2,000.
            self._records = {record.name: record for record in self.list_devices()}
            self._names = set(self._records)
        return self._names

    def _write(self, work: Callable[[Connection], T], durable: bool = True,
               may_conflict: bool = True) -> T:
        """Run *work* in one transaction. Durable commits fsync the WAL; the
        others survive a crashed dmd but not a power cut, and are made durable
        by the next durable commit (the WAL is written in order). In a batch,
        a write that *may_conflict* with a unique name or UUID runs in a
        savepoint of its own."""
        if self._batch is not None:
            if not may_conflict:
                return work(self._batch)
            try:
                with self._batch.begin_nested():
                    return work(self._batch)
            except IntegrityError:
                raise RecordExists("a device with that name or UUID is recorded already"
                                   ) from None
        with self._engine.connect() as connection:
            try:
                # pysqlite opens the transaction only at the first write, so the
                # pragma still applies to this commit.
                connection.exec_driver_sql(
                    f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                result = work(connection)
                connection.commit()
            except IntegrityError:
                connection.rollback()
                raise RecordExists("a device with that name or UUID is recorded already"
                                   ) from None
            return result

    @staticmethod
    def _device_id(connection: Connection, name: str) -> int:
        table = tables.devices
        found = connection.execute(select(table.c.id).where(table.c.name == name)).first()
        if found is None:
            raise RecordNotFound(f"no record of a device named {name!r}")
        return int(found.id)

    @staticmethod
    def _devices(connection: Connection, name: str | None = None) -> list[DeviceRecord]:
        """Every device's record (or the one named *name*), with its labels."""
        rows, tags_ = tables.devices, tables.labels
        query = select(rows).order_by(rows.c.id)
        tags = select(tags_).order_by(tags_.c.key)
        if name is not None:
            query = query.where(rows.c.name == name)
            tags = tags.join(rows, rows.c.id == tags_.c.device_id).where(rows.c.name == name)
        of: dict[int, dict[str, str]] = {}
        for tag in connection.execute(tags):
            of.setdefault(tag.device_id, {})[tag.key] = tag.value
        return [_device(row, of.get(row.id, {})) for row in connection.execute(query)]

    # -- devices -----------------------------------------------------------
    def add_devices(self, records: Sequence[DeviceRecord]) -> None:
        """Many label-less records in one transaction (a benchmark's or an
        import's thousand devices); each as add_device would store it."""
        if any(record.labels for record in records):
            raise ValueError("add_devices takes records without labels")
        with self._engine.begin() as connection:
            connection.execute(insert(tables.devices), [dict(
                name=record.name, uuid=record.uuid or None,
                table_json=_table_json(redact_table(record.table)[0]),
                read_only=record.read_only, owner_uid=record.owner_uid, created_at=_now(),
                persistent=record.persistent, key_withheld=redact_table(record.table)[1])
                for record in records])

    def add_device(self, record: DeviceRecord) -> None:
        stored, withheld = redact_table(record.table)
        labels = dict(record.labels)
        created = _now()
        added = DeviceRecord(
            name=record.name, uuid=record.uuid or None, table=stored,
            read_only=record.read_only, owner_uid=record.owner_uid,
            persistent=record.persistent, labels=labels, created_at=created,
            key_withheld=withheld, drifted=None)

        def work(connection: Connection) -> None:
            # Straight to the driver, as the journal's writes: one per create.
            done = connection.exec_driver_sql(
                "INSERT INTO devices (name, uuid, table_json, read_only, owner_uid, "
                "created_at, persistent, key_withheld) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (added.name, added.uuid, _table_json(stored), int(added.read_only),
                 added.owner_uid, _sql_time(created), int(added.persistent), int(withheld)))
            if labels:
                connection.exec_driver_sql(
                    "INSERT INTO labels (device_id, key, value) VALUES (?, ?, ?)",
                    [(done.lastrowid, k, v) for k, v in labels.items()])

        self._write(work)
        self._learn(record.name, added=record.name, record=added)

    def get_device(self, name: str) -> DeviceRecord | None:
        if name not in self._known_names():
            return None
        cached = self._records.get(name)
        if cached is not None:
            return cached
        with self._engine.connect() as connection:
            found = self._devices(connection, name)
        record = found[0] if found else None
        if record is not None:
            self._records[name] = record
        return record

    def list_devices(self) -> list[DeviceRecord]:
        with self._engine.connect() as connection:
            return self._devices(connection)

    def update_table(self, name: str, table: Sequence[TargetLine], read_only: bool) -> None:
        stored, withheld = redact_table(table)

        def work(connection: Connection) -> None:
            connection.execute(update(tables.devices).where(
                tables.devices.c.id == self._device_id(connection, name)).values(
                table_json=_table_json(stored), read_only=read_only, key_withheld=withheld,
                drifted=None))

        self._write(work)
        self._learn(name)

    def rename_device(self, old: str, new: str) -> None:
        def work(connection: Connection) -> None:
            connection.execute(update(tables.devices).where(
                tables.devices.c.id == self._device_id(connection, old)).values(name=new))

        self._write(work)
        self._learn(old, new, added=new, removed=old)

    def set_uuid(self, name: str, uuid: str) -> None:
        def work(connection: Connection) -> None:
            connection.execute(update(tables.devices).where(
                tables.devices.c.id == self._device_id(connection, name)).values(uuid=uuid))

        self._write(work)
        self._learn(name)

    def set_labels(self, name: str, labels: dict[str, str]) -> None:
        def work(connection: Connection) -> None:
            device_id = self._device_id(connection, name)
            connection.execute(delete(tables.labels).where(
                tables.labels.c.device_id == device_id))
            if labels:
                connection.execute(insert(tables.labels), [
                    {"device_id": device_id, "key": k, "value": v} for k, v in labels.items()])

        self._write(work)
        self._learn(name)

    def set_drifted(self, name: str, reason: str | None) -> None:
        self._write(lambda c: c.execute(update(tables.devices).where(
            tables.devices.c.id == self._device_id(c, name)).values(drifted=reason)),
            may_conflict=False)
        self._learn(name)

    def remove_device(self, name: str) -> None:
        def work(connection: Connection) -> None:
            device_id = self._device_id(connection, name)
            connection.execute(delete(tables.labels).where(
                tables.labels.c.device_id == device_id))
            connection.execute(delete(tables.devices).where(tables.devices.c.id == device_id))

        self._write(work, may_conflict=False)
        self._learn(name, removed=name)

    # -- pools and volumes ---------------------------------------------------
    def add_pool(self, record: PoolRecord) -> None:
        self._write(lambda c: c.execute(insert(tables.pools).values(
            _pool_values(record, max(record.generation, 1)))))

    def import_pool(self, record: PoolRecord, volumes: list[VolumeRecord]) -> None:
        """Record a pool found on its devices, with its volumes and the
        generation of the description they came from, in one transaction."""
        def work(connection: Connection) -> None:
            done = connection.execute(insert(tables.pools).values(
                _pool_values(record, record.generation)))
            assert done.inserted_primary_key is not None
            _insert_volumes(connection, done.inserted_primary_key[0], volumes)

        self._write(work)

    def replace_pool(self, record: PoolRecord, volumes: list[VolumeRecord]) -> None:
        """Make the records of pool *record* (by UUID) what its devices say:
        the pool's fields and exactly *volumes*, in one transaction."""
        def work(connection: Connection) -> Callable[[], None]:
            found = connection.execute(
                select(tables.pools.c.id).where(tables.pools.c.uuid == record.uuid)).first()
            if found is None:
                raise RecordNotFound(f"no record of pool {record.uuid}")
            values = _pool_values(record, record.generation)
            for kept in ("name", "uuid", "created_at"):
                del values[kept]
            connection.execute(update(tables.pools).where(
                tables.pools.c.id == found.id).values(values))
            connection.execute(delete(tables.volumes).where(
                tables.volumes.c.pool_id == found.id))
            _insert_volumes(connection, found.id, volumes)
            return self._forget_volumes(record.name)

        self._after_commit(self._write(work))

    def rename_pool(self, name: str, new_name: str) -> PoolRecord:
        """Pool *name* is *new_name* from now on (its volumes follow: they
        name their pool by its row); its generation moves on."""
        def work(connection: Connection) -> tuple[Callable[[], None], PoolRecord]:
            sql = connection.exec_driver_sql
            try:
                done = sql("UPDATE pools SET name = ?, generation = generation + 1 "
                           "WHERE name = ?", (new_name, name))
            except IntegrityError:
                raise RecordExists(f"a pool named {new_name!r} is recorded already") from None
            if done.rowcount != 1:
                raise RecordNotFound(f"no record of a pool named {name!r}")
            row = _pool_named(connection, new_name)
            assert row is not None

            def forget() -> None:
                self._volumes.pop(name, None)
                self._volumes.pop(new_name, None)
            return forget, pool_record(row)

        forget, record = self._write(work)
        self._after_commit(forget)
        return record

    def list_pools(self) -> list[PoolRecord]:
        with self._engine.connect() as connection:
            return [pool_record(r) for r in connection.execute(
                select(tables.pools).order_by(tables.pools.c.id))]

    def get_pool(self, name: str) -> PoolRecord | None:
        with self._engine.connect() as connection:
            row = _pool_named(connection, name)
            return pool_record(row) if row is not None else None

    def remove_pool(self, name: str) -> None:
        def work(connection: Connection) -> None:
            try:
                gone = connection.execute(delete(tables.pools).where(tables.pools.c.name == name))
            except IntegrityError:  # the volumes' foreign key
                raise StateError(f"pool {name!r} still has volume records; they go first"
                                 ) from None
            if gone.rowcount != 1:
                raise RecordNotFound(f"no record of a pool named {name!r}")

        self._write(work, may_conflict=False)
        self._after_commit(self._forget_volumes(name))

    def list_volumes(self, pool: str | None = None) -> list[VolumeRecord]:
        with self._engine.connect() as connection:
            query = select(tables.volumes, tables.pools.c.name.label("pool_name")).join(
                tables.pools, tables.volumes.c.pool_id == tables.pools.c.id)
            if pool is None:
                return [volume_record(row, row.pool_name)
                        for row in connection.execute(query.order_by(tables.volumes.c.id))]
            found = connection.exec_driver_sql(
                "SELECT uuid, generation FROM pools WHERE name = ?", (pool,)).first()
            if found is None:
                return []
            key = (str(found[0]), int(found[1]))
            cached = self._volumes.get(pool)
            if cached is not None and cached[0] == key:
                return list(cached[1])
            read = [volume_record(row, pool) for row in connection.execute(
                query.where(tables.pools.c.name == pool).order_by(tables.volumes.c.id))]
            self._volumes[pool] = (key, read)
            return list(read)

    def pool_change(self, pool: str, *, transaction_id: int | None = None,
                    next_thin_id: int | None = None, add: VolumeRecord | None = None,
                    update: VolumeRecord | None = None, remove: str | None = None,
                    layout: PoolLayout | None = None,
                    stopped: bool | None = None) -> PoolRecord:
        """One transaction for what a pool operation records at its end: the
        pool's new transaction id (and next thin id) with the volume it
        added, changed or removed (by UUID), so the two never disagree.
        Returns the pool's record as it is now (its generation moved on)."""
        # Raw statements: every create, snapshot and delete makes two of these
        # changes, and the ORM's select-load-flush was most of their time.
        def work(connection: Connection) -> tuple[Callable[[], None], PoolRecord]:
            sql = connection.exec_driver_sql
            row = _pool_named(connection, pool)
            if row is None:
                raise RecordNotFound(f"no record of a pool named {pool!r}")
            now = pool_record(row)
            before = (now.uuid, now.generation)
            record = replace(
                now, generation=now.generation + 1,
                transaction_id=now.transaction_id if transaction_id is None
                else transaction_id,
                next_thin_id=now.next_thin_id if next_thin_id is None
                else max(now.next_thin_id, next_thin_id),
                layout=layout if layout is not None else now.layout,
                stopped=now.stopped if stopped is None else stopped)
            sql("UPDATE pools SET generation = ?, transaction_id = ?, next_thin_id = ?, "
                "layout_json = ?, stopped = ? WHERE id = ?",
                (record.generation, record.transaction_id, record.next_thin_id,
                 layout.to_json() if layout is not None else row.layout_json,
                 record.stopped, row.id))
            # What a read would now give, for the cache once committed.
            fresh = edited = None
            if add is not None:
                created = _now()
                fresh = replace(add, pool=pool, created_at=created)
                columns = {"uuid": add.uuid, "pool_id": row.id,
                           "origin_uuid": add.origin_uuid, "created_at": _sql_time(created),
                           **volume_values(add)}
                sql(f"INSERT INTO volumes ({', '.join(columns)}) "
                    f"VALUES ({', '.join('?' for _ in columns)})", tuple(columns.values()))
            if update is not None:
                values = volume_values(update)
                done = sql(f"UPDATE volumes SET {', '.join(f'{k} = ?' for k in values)} "
                           "WHERE uuid = ?", (*values.values(), update.uuid))
                if done.rowcount != 1:
                    raise RecordNotFound(f"no record of volume {update.uuid}")
                kept = sql("SELECT origin_uuid, created_at FROM volumes "
                           "WHERE uuid = ?", (update.uuid,)).one()
                edited = replace(update, pool=pool, origin_uuid=kept.origin_uuid,
                                 created_at=datetime.fromisoformat(kept.created_at))
            if remove is not None:
                sql("DELETE FROM volumes WHERE uuid = ?", (remove,))
            after = (record.uuid, record.generation)

            def learn() -> None:
                cached = self._volumes.pop(pool, None)
                if cached is None or cached[0] != before:
                    return
                volumes = [edited if edited is not None and v.uuid == edited.uuid else v
                           for v in cached[1] if v.uuid != remove]
                self._volumes[pool] = (after, [*volumes, *([fresh] if fresh else [])])

            return learn, record

        learn, record = self._write(work)
        self._after_commit(learn)
        return record

    def _forget_volumes(self, pool: str) -> Callable[[], None]:
        def forget() -> None:
            self._volumes.pop(pool, None)

        return forget

    def _after_commit(self, learn: Callable[[], None]) -> None:
        if self._batch is not None:
            self._batch_learnt.append(learn)
        else:
            learn()

    # -- the intent journal ------------------------------------------------
    # The journal's writes are single SQL statements handed to the driver:
    # every operation makes several, and the ORM's load-modify-flush (or even
    # compiling a Core statement) was most of the store thread's time.
    def begin_intent(self, operation: str, device: str, args: dict[str, Any]) -> int:
        def work(connection: Connection) -> int:
            done = connection.exec_driver_sql(
                "INSERT INTO intents (operation, device, args_json, state, step, created_at) "
                "VALUES (?, ?, ?, 'pending', 0, ?)",
                (operation, device, json.dumps(args), _sql_now()))
            return int(done.lastrowid)

        return self._write(work, may_conflict=False)

    @staticmethod
    def _update_intent(intent_id: int, sql: str, values: tuple[Any, ...]
                       ) -> Callable[[Connection], None]:
        def work(connection: Connection) -> None:
            done = connection.exec_driver_sql(sql, (*values, intent_id))
            if done.rowcount != 1:
                raise RecordNotFound(f"no intent {intent_id}")

        return work

    def advance_intent(self, intent_id: int, step: int) -> None:
        # Progress marks only refine what recovery reads from the kernel anyway.
        self._write(self._update_intent(intent_id, "UPDATE intents SET step = ? WHERE id = ?",
                                        (step,)), durable=False, may_conflict=False)

    def finish_intent(self, intent_id: int, state: str) -> None:
        self._write(self._update_intent(
            intent_id, "UPDATE intents SET state = ?, finished_at = ? WHERE id = ?",
            (state, _sql_now())), may_conflict=False)

    def pending_intents(self) -> list[IntentRecord]:
        with self._engine.connect() as connection:
            return [_intent(row) for row in connection.execute(
                select(tables.intents).where(tables.intents.c.state == "pending")
                .order_by(tables.intents.c.id))]


def _configure_connection(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
    except sqlite3.DatabaseError as exc:
        raise OperationalError("PRAGMA", {}, exc) from exc
    finally:
        cursor.close()


class AsyncStateStore:
    """``StateStore`` for the event loop: every call runs on one dedicated thread.

    Writes are committed in groups: a write waits in a queue while the
    thread is busy, and everything queued by then goes into the next
    transaction (StateStore.batch), with one fsync for all. A write's
    awaitable returns once its transaction is committed, so "the intent is on
    disk before the kernel is touched" holds for each operation, while many
    concurrent operations share the cost of a commit.
    """

    def __init__(self, store: StateStore) -> None:
        self.sync = store
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dmd-state")
        self._queue: list[tuple[Callable[[], Any], bool, asyncio.Future[Any]]] = []
        self._queue_lock = threading.Lock()
        self._flush_scheduled = False
        self.commits = 0  # transactions committed by _flush (for tests and benches)
        # Pool name -> how many writes of its records (pool or volumes) were
        # made: records read at another count may be stale. Counted for a
        # failed write too (what it left is not known).
        self.pool_writes: Counter[str] = Counter()

    async def _pool_write(self, pool: str, call: Callable[[], T]) -> T:
        try:
            return await self._write(call)
        finally:
            self.pool_writes[pool] += 1

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call, *args)

    async def _write(self, call: Callable[..., T], *args: Any, durable: bool = True) -> T:
        return await self._enqueue(call, *args, durable=durable)

    def _enqueue(self, call: Callable[..., T], *args: Any, durable: bool = True,
                 flush: bool = True) -> asyncio.Future[T]:
        """Queue a write now (writes commit in the order they were queued);
        the future settles once its transaction is committed. Not *flush*:
        the write starts no transaction of its own, it goes with the next
        write queued."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._queue_lock:
            self._queue.append((lambda: call(*args), durable, future))
            schedule = flush and not self._flush_scheduled
            self._flush_scheduled |= flush
        if schedule:
            self._thread.submit(self._flush)
        return future

    def _flush(self) -> None:
        """On the store's thread: commit everything queued, as one transaction."""
        with self._queue_lock:
            batch, self._queue = self._queue, []
            self._flush_scheduled = False
        outcomes: list[tuple[bool, Any]] = []
        try:
            with self.sync.batch(durable=any(durable for _, durable, _ in batch)):
                for call, _, _ in batch:
                    try:
                        outcomes.append((True, call()))
                    except Exception as exc:  # handed to its caller
                        outcomes.append((False, exc))
            self.commits += 1
        except Exception as exc:  # the commit failed, so every write in it did
            outcomes = [(False, exc)] * len(batch)
        for (_, _, future), (ok, value) in zip(batch, outcomes, strict=True):
            future.get_loop().call_soon_threadsafe(_settle, future, ok, value)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.sync.close()

    async def add_device(self, record: DeviceRecord) -> None:
        await self._write(self.sync.add_device, record)

    async def get_device(self, name: str) -> DeviceRecord | None:
        return await self._run(self.sync.get_device, name)

    async def list_devices(self) -> list[DeviceRecord]:
        return await self._run(self.sync.list_devices)

    async def update_table(self, name: str, table: list[TargetLine], read_only: bool) -> None:
        await self._write(self.sync.update_table, name, table, read_only)

    async def rename_device(self, old: str, new: str) -> None:
        await self._write(self.sync.rename_device, old, new)

    async def set_uuid(self, name: str, uuid: str) -> None:
        await self._write(self.sync.set_uuid, name, uuid)

    async def set_labels(self, name: str, labels: dict[str, str]) -> None:
        await self._write(self.sync.set_labels, name, labels)

    async def set_drifted(self, name: str, reason: str | None) -> None:
        await self._write(self.sync.set_drifted, name, reason)

    async def remove_device(self, name: str) -> None:
        await self._write(self.sync.remove_device, name)

    async def begin_intent(self, operation: str, device: str, args: dict[str, Any]) -> int:
        return await self._write(self.sync.begin_intent, operation, device, args)

    async def advance_intent(self, intent_id: int, step: int) -> None:
        # Progress marks only refine what recovery reads from the kernel: not
        # fsynced (a later durable commit makes them durable too).
        await self._write(self.sync.advance_intent, intent_id, step, durable=False)

    def advance_intent_soon(self, intent_id: int, step: int) -> asyncio.Future[None]:
        """Queue a progress mark without waiting for its commit: it goes with
        the next write queued after it (the intent's end, a record), in its
        transaction, and never makes one of its own (a create's marks were
        half of its transactions, each a round of the store's thread)."""
        return self._enqueue(self.sync.advance_intent, intent_id, step, durable=False,
                             flush=False)

    async def finish_intent(self, intent_id: int, state: str) -> None:
        await self._write(self.sync.finish_intent, intent_id, state)

    async def pending_intents(self) -> list[IntentRecord]:
        return await self._run(self.sync.pending_intents)

    async def add_pool(self, record: PoolRecord) -> None:
        await self._pool_write(record.name, lambda: self.sync.add_pool(record))

    async def list_pools(self) -> list[PoolRecord]:
        return await self._run(self.sync.list_pools)

    async def get_pool(self, name: str) -> PoolRecord | None:
        return await self._run(self.sync.get_pool, name)

    async def remove_pool(self, name: str) -> None:
        await self._pool_write(name, lambda: self.sync.remove_pool(name))

    async def import_pool(self, record: PoolRecord, volumes: list[VolumeRecord]) -> None:
        await self._pool_write(record.name, lambda: self.sync.import_pool(record, volumes))

    async def replace_pool(self, record: PoolRecord, volumes: list[VolumeRecord]) -> None:
        await self._pool_write(record.name, lambda: self.sync.replace_pool(record, volumes))

    async def list_volumes(self, pool: str | None = None) -> list[VolumeRecord]:
        return await self._run(self.sync.list_volumes, pool)

    async def rename_pool(self, name: str, new_name: str) -> PoolRecord:
        self.pool_writes[new_name] += 1  # records in hand under that name are stale
        return await self._pool_write(name, lambda: self.sync.rename_pool(name, new_name))

    async def pool_change(self, pool: str, *, transaction_id: int | None = None,
                          next_thin_id: int | None = None, add: VolumeRecord | None = None,
                          update: VolumeRecord | None = None, remove: str | None = None,
                          layout: PoolLayout | None = None,
                          stopped: bool | None = None) -> PoolRecord:
        return await self._pool_write(pool, lambda: self.sync.pool_change(
            pool, transaction_id=transaction_id, next_thin_id=next_thin_id, add=add,
            update=update, remove=remove, layout=layout, stopped=stopped))


# The columns of a pool's record (dmd.state.pool_records.pool_record), for raw
# statements.
_POOL_COLUMNS = ("id, name, uuid, owner_uid, block_sectors, on_full, low_water_percent, "
                 "transaction_id, next_thin_id, layout_json, created_at, generation, "
                 "no_space_timeout, stopped")


def _pool_named(connection: Connection, name: str) -> Row[Any] | None:
    """The pool's row by a raw statement (an operation's read of its pool,
    and its change's: the hot path), or None."""
    return connection.exec_driver_sql(
        f"SELECT {_POOL_COLUMNS} FROM pools WHERE name = ?", (name,)).first()


def _pool_values(record: PoolRecord, generation: int) -> dict[str, Any]:
    return dict(
        name=record.name, uuid=record.uuid, owner_uid=record.owner_uid,
        block_sectors=record.block_sectors, on_full=record.on_full,
        low_water_percent=record.low_water_percent, no_space_timeout=record.no_space_timeout,
        transaction_id=record.transaction_id, next_thin_id=record.next_thin_id,
        layout_json=record.layout.to_json(), created_at=_now(), generation=generation,
        stopped=record.stopped)


def _insert_volumes(connection: Connection, pool_id: int,
                    records: Sequence[VolumeRecord]) -> None:
    if records:
        connection.execute(insert(tables.volumes), [dict(
            uuid=volume.uuid, pool_id=pool_id, origin_uuid=volume.origin_uuid,
            created_at=_now(), **volume_values(volume))
            for volume in records])


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.cancelled():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
