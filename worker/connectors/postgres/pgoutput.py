"""The messages of PostgreSQL's built-in `pgoutput` plugin (protocol version 1), parsed, and
the changes of one table folded into one operation per key.

Pure functions and plain data: no I/O.  `logical` reads the messages with
`pg_logical_slot_peek_binary_changes(slot, upto_lsn, n, 'proto_version', '1',
'publication_names', pub)`, one message per row, and hands each row's `data` to `parse`.

The format is PostgreSQL's "Logical Replication Message Formats": every message starts
with one byte naming it; integers are big-endian; strings end with a zero byte; a tuple is
an Int16 column count, then per column `n` (null), `u` (an unchanged TOASTed value, not
sent) or `t` (Int32 length, then the value in text form).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, cast


class ProtocolError(ValueError):
    """A message this parser does not understand (another protocol version, a cut message)."""


class _Unchanged:
    """The value of a `u` column: an unchanged TOASTed value the stream does not carry."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()

Value = str | None | _Unchanged
Row = tuple[Value, ...]


@dataclass(frozen=True)
class Begin:
    final_lsn: int  # where the transaction's commit record starts
    timestamp: int  # microseconds since 2000-01-01
    xid: int


@dataclass(frozen=True)
class Commit:
    flags: int
    commit_lsn: int  # where the commit record starts
    end_lsn: int  # where it ends: the position a slot is advanced to once this is applied
    timestamp: int


@dataclass(frozen=True)
class Origin:
    lsn: int
    name: str


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    key: bool  # part of the replica identity


@dataclass(frozen=True)
class Relation:
    relid: int
    namespace: str
    name: str
    replica_identity: str  # d(efault), n(othing), f(ull), i(ndex)
    columns: tuple[Column, ...]


@dataclass(frozen=True)
class Type:
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True)
class Insert:
    relid: int
    new: Row


@dataclass(frozen=True)
class Update:
    relid: int
    new: Row
    old: Row | None = None  # the old key ('K') or old row ('O'), when sent
    old_kind: str | None = None


@dataclass(frozen=True)
class Delete:
    relid: int
    old: Row
    old_kind: str  # 'K' (the replica identity's columns, others null) or 'O' (the whole row)


@dataclass(frozen=True)
class Truncate:
    relids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


Message = Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate

_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")


class _Reader:
    """A cursor over one message's bytes."""

    __slots__ = ("at", "data")

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = bytes(data)
        self.at = 0

    def take(self, n: int) -> bytes:
        end = self.at + n
        if n < 0 or end > len(self.data):
            raise ProtocolError(f"message cut short at byte {self.at} (wanted {n} more)")
        chunk = self.data[self.at : end]
        self.at = end
        return chunk

    def byte(self) -> str:
        return chr(self.take(1)[0])

    def int8(self) -> int:
        return self.take(1)[0]

    def int16(self) -> int:
        return int(_I16.unpack(self.take(2))[0])

    def int32(self) -> int:
        return int(_I32.unpack(self.take(4))[0])

    def uint32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def int64(self) -> int:
        return int(_I64.unpack(self.take(8))[0])

    def lsn(self) -> int:
        return int(_U64.unpack(self.take(8))[0])

    def string(self) -> str:
        end = self.data.find(b"\0", self.at)
        if end < 0:
            raise ProtocolError(f"unterminated string at byte {self.at}")
        text = self.data[self.at : end].decode()
        self.at = end + 1
        return text

    def tuple(self) -> Row:
        # The hot path (every changed row): plain indexing, no call per field.
        data, at = self.data, self.at
        if at + 2 > len(data):
            raise ProtocolError(f"message cut short at byte {at} (a tuple's column count)")
        (count,) = _I16.unpack_from(data, at)
        at += 2
        values: list[Value] = []
        append = values.append
        for _ in range(count):
            if at >= len(data):
                raise ProtocolError(f"message cut short at byte {at} (a tuple's column)")
            kind = data[at]
            at += 1
            if kind == 0x74:  # t: Int32 length, then the text
                if at + 4 > len(data):
                    raise ProtocolError(f"message cut short at byte {at} (a value's length)")
                (size,) = _I32.unpack_from(data, at)
                end = at + 4 + size
                if size < 0 or end > len(data):
                    raise ProtocolError(f"message cut short at byte {at} (a value of {size} bytes)")
                append(data[at + 4 : end].decode())
                at = end
            elif kind == 0x6E:  # n: null
                append(None)
            elif kind == 0x75:  # u: unchanged TOAST, not sent
                append(UNCHANGED)
            else:  # b (binary) only comes when asked for, with protocol version 2 or later
                raise ProtocolError(f"unknown tuple column kind {chr(kind)!r}")
        self.at = at
        return tuple(values)

    def end(self) -> None:
        if self.at != len(self.data):
            raise ProtocolError(f"{len(self.data) - self.at} bytes left over at the end of a message")


def parse(data: bytes | memoryview) -> Message:
    """One pgoutput message (a row's `data` from `pg_logical_slot_peek_binary_changes`)."""
    r = _Reader(data)
    kind = r.byte()
    message: Message
    if kind == "B":
        message = Begin(r.lsn(), r.int64(), r.uint32())
    elif kind == "C":
        message = Commit(r.int8(), r.lsn(), r.lsn(), r.int64())
    elif kind == "O":
        message = Origin(r.lsn(), r.string())
    elif kind == "R":
        message = _relation(r)
    elif kind == "Y":
        message = Type(r.uint32(), r.string(), r.string())
    elif kind == "I":
        relid = r.uint32()
        if r.byte() != "N":
            raise ProtocolError("an insert without its new tuple")
        message = Insert(relid, r.tuple())
    elif kind == "U":
        message = _update(r)
    elif kind == "D":
        relid = r.uint32()
        old_kind = r.byte()
        if old_kind not in ("K", "O"):
            raise ProtocolError(f"a delete with an old tuple of kind {old_kind!r}")
        message = Delete(relid, r.tuple(), old_kind)
    elif kind == "T":
        count = r.int32()
        options = r.int8()
        relids = tuple(r.uint32() for _ in range(count))
        message = Truncate(relids, bool(options & 1), bool(options & 2))
    else:
        raise ProtocolError(f"unknown message type {kind!r}")
    r.end()
    return message


def _relation(r: _Reader) -> Relation:
    relid = r.uint32()
    namespace = r.string() or "pg_catalog"  # pgoutput sends "" for pg_catalog
    name = r.string()
    identity = r.byte()
    columns = []
    for _ in range(r.int16()):
        flags = r.int8()
        columns.append(Column(r.string(), r.uint32(), r.int32(), bool(flags & 1)))
    return Relation(relid, namespace, name, identity, tuple(columns))


def _update(r: _Reader) -> Update:
    relid = r.uint32()
    kind = r.byte()
    old: Row | None = None
    old_kind: str | None = None
    if kind in ("K", "O"):
        old_kind, old = kind, r.tuple()
        kind = r.byte()
    if kind != "N":
        raise ProtocolError(f"an update with a tuple of kind {kind!r} where the new one belongs")
    return Update(relid, r.tuple(), old, old_kind)


# -- positions in the WAL ------------------------------------------------------------------


def lsn_from_text(text: str) -> int:
    """`'16/B374D848'` (a pg_lsn as text) as a 64-bit integer."""
    high, sep, low = text.partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


def lsn_to_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


# -- folding the changes of one table into one operation per key ---------------------------


@dataclass
class Op:
    """What a batch does to one key: upsert `values` or delete the row.

    `values` are in the mirror's column order, as text; the positions in `unchanged` hold
    an unchanged TOASTed value the stream did not carry (the destination's is kept).
    `deleted` is the soft-delete flag ('t', 'f', or None when unknown: the source's column
    was itself unchanged TOAST).
    """

    values: list[str | None]
    unchanged: set[int] = field(default_factory=set)
    delete: bool = False
    deleted: str | None = "f"


@dataclass
class Layout:
    """Where the mirror's columns are in a relation's tuples."""

    positions: tuple[int, ...]  # per mirrored column, its index in the relation's tuple
    key: tuple[int, ...]  # per key column, its index in the relation's tuple
    soft: int | None  # the soft-delete column's index, if deletes are soft

    @classmethod
    def of(cls, relation: Relation, columns: Sequence[str], key: Sequence[str], soft: str | None) -> Layout:
        """The layout of `relation` for a mirror of `columns`; ProtocolError naming a column the
        relation lacks."""
        index = {c.name: i for i, c in enumerate(relation.columns)}
        missing = [c for c in (*columns, *key, *([soft] if soft else [])) if c not in index]
        if missing:
            raise ProtocolError(
                f"{relation.namespace}.{relation.name} has no column {', '.join(dict.fromkeys(missing))}"
                " in the change stream (dropped or renamed since the mirror started)"
            )
        return cls(
            tuple(index[c] for c in columns),
            tuple(index[k] for k in key),
            None if soft is None else index[soft],
        )


def soft_flag(value: Value) -> str | None:
    """The soft-delete flag of a row from its column's text: set, non-null and not false."""
    if value is UNCHANGED:
        return None
    return "t" if value is not None and value not in ("false", "f") else "f"


@dataclass
class Batch:
    """Changes of one table folded in stream order into one operation per key.

    Applied to the destination in any order, the operations leave it as the changes applied
    one by one would (each key's last write wins; a truncate first empties the table).
    """

    deletes: bool = True  # whether deletes (and truncates) are applied at all
    truncate: bool = False
    ops: dict[tuple[str | None, ...], Op] = field(default_factory=dict)
    # keys whose row must be read again from the source (their unchanged values are not
    # where the destination keeps them: the key changed)
    refetch: set[tuple[str | None, ...]] = field(default_factory=set)
    changes: int = 0

    def __len__(self) -> int:
        return len(self.ops) + len(self.refetch)

    def insert(self, layout: Layout, new: Row) -> None:
        self.changes += 1
        key = _key(layout, new)
        self.refetch.discard(key)
        self.ops[key] = _op(layout, new)

    def update(self, layout: Layout, new: Row, old: Row | None = None) -> None:
        self.changes += 1
        key = _key(layout, new)
        moved = old is not None and _key(layout, old, fallback=new) != key
        op = _op(layout, new)
        before = self.ops.get(key)
        if moved:
            assert old is not None
            gone = _key(layout, old, fallback=new)
            previous = self.ops.get(gone)
            if previous is not None and not previous.delete:
                _fill(op, previous)  # the unchanged values, from earlier in this batch
            if self.deletes:
                self._delete(gone, layout)
            if op.unchanged:  # kept under the old key in the destination: read the row again
                self.ops.pop(key, None)
                self.refetch.add(key)
                return
        elif before is not None and not before.delete and op.unchanged:
            _fill(op, before)
        if key in self.refetch and op.unchanged:
            return  # read again from the source, which has the values this change kept
        self.refetch.discard(key)
        self.ops[key] = op

    def delete(self, layout: Layout, old: Row) -> None:
        self.changes += 1
        if self.deletes:
            self._delete(_key(layout, old), layout)

    def _delete(self, key: tuple[str | None, ...], layout: Layout) -> None:
        self.refetch.discard(key)
        values: list[str | None] = [None] * len(layout.positions)
        for i, k in enumerate(key):
            values[layout.positions.index(layout.key[i])] = k
        self.ops[key] = Op(values, delete=True, deleted="t")

    def truncated(self) -> None:
        """A TRUNCATE of the table: everything before it in the batch is moot."""
        if self.deletes:
            self.ops.clear()
            self.refetch.clear()
            self.truncate = True


def _key(layout: Layout, row: Row, fallback: Row | None = None) -> tuple[str | None, ...]:
    key = []
    for i in layout.key:
        value = row[i]
        if value is UNCHANGED and fallback is not None:
            value = fallback[i]
        if value is UNCHANGED:
            raise ProtocolError("a key column's value was not sent (unchanged TOAST)")
        assert not isinstance(value, _Unchanged)
        key.append(value)
    return tuple(key)


def _op(layout: Layout, row: Row) -> Op:
    flag = soft_flag(row[layout.soft]) if layout.soft is not None else "f"
    picked = [row[i] for i in layout.positions]
    if UNCHANGED not in picked:  # the usual case
        return Op(cast(list[str | None], picked), deleted=flag)
    unchanged = {n for n, value in enumerate(picked) if value is UNCHANGED}
    values = [None if n in unchanged else cast(str | None, value) for n, value in enumerate(picked)]
    return Op(values, unchanged, deleted=flag)


def _fill(op: Op, previous: Op) -> None:
    """Take the values `op` lacks (unchanged TOAST) from the same row's earlier operation."""
    for n in list(op.unchanged):
        op.values[n] = previous.values[n]
        if n not in previous.unchanged:
            op.unchanged.discard(n)
    if op.deleted is None:
        op.deleted = previous.deleted


@dataclass
class Stream:
    """Where a mirror is in its table's change stream, fed one message at a time.

    Transactions that committed at or before `saved` (the end of the last transaction whose
    changes the destination holds, as the job's state says) are skipped: after a crash
    between the destination's commit and the slot's advance, the slot hands them out again.
    `position` is the end of the last transaction whose changes were all handed to a batch.
    """

    table: tuple[str, str]  # (schema, name)
    columns: tuple[str, ...]
    key: tuple[str, ...]
    soft: str | None
    saved: int
    position: int = 0
    layouts: dict[int, Layout] = field(default_factory=dict)
    skipping: bool = False
    skipped: int = 0  # changes of transactions skipped

    def __post_init__(self) -> None:
        self.position = max(self.position, self.saved)

    def feed(self, message: Message, batch: Batch) -> None:
        if isinstance(message, Insert | Update | Delete | Truncate):  # most messages: first
            self._change(message, batch)
        elif isinstance(message, Begin):
            self.skipping = message.final_lsn < self.saved
        elif isinstance(message, Commit):
            if not self.skipping:
                self.position = max(self.position, message.end_lsn)
            self.skipping = False
        elif isinstance(message, Relation):
            # Relations are described again after every schema change, skipped or not.
            self.layouts.pop(message.relid, None)
            if (message.namespace, message.name) == self.table:
                self.layouts[message.relid] = Layout.of(message, self.columns, self.key, self.soft)

    def _change(self, message: Insert | Update | Delete | Truncate, batch: Batch) -> None:
        if self.skipping:
            self.skipped += 1
            return
        if isinstance(message, Truncate):
            if any(relid in self.layouts for relid in message.relids):
                batch.truncated()
            return
        layout = self.layouts.get(message.relid)
        if layout is None:
            return  # another table (the publication was given more)
        if isinstance(message, Update):
            batch.update(layout, message.new, message.old)
        elif isinstance(message, Insert):
            batch.insert(layout, message.new)
        else:
            batch.delete(layout, message.old)
