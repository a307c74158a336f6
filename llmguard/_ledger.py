"""Budget ledgers: spend and reservations per budget window, in integer pico-dollars.

Every operation is atomic: a reservation is taken only if spent + reserved + estimate fits
the limit, checked and written in one step, so concurrent callers cannot walk past it.
Reservations expire, so a process killed mid-call cannot hold budget forever. The local and
memory storages run the Python below inside their atomic section (an SQLite transaction for
local storage); Redis runs the same logic as Lua scripts.

This module also owns the storage key format of budgets (see "Storage keys" below): every
other module builds and parses budget keys with the functions here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ._redact import redact_uri
from ._storage import LocalStorage, MemoryStorage, RedisStorage, Storage, storage_errors

PICO = 10**12  # pico-dollars per dollar

# -- Storage keys ---------------------------------------------------------------------------
# A window's ledger:    llmguard:budget:<name>:-:<window>             (a budget without key=)
#                       llmguard:budget:<name>:=<key>:<window>        (one key of a keyed budget)
# its alert flags:      <ledger key>:alert:<threshold>
# its spend-rate alert flag (set while a burn episode lasts):  <ledger key>:alert:burn
# the recent spend per time slice (burn_alert=), across windows:
#                       llmguard:budget:<name>:-:burn  /  llmguard:budget:<name>:=<key>:burn
# a budget's definition (limit, period, time zone, keyed), stored on its first call:
#                       llmguard:budget-config:<name>
# the largest cost seen per function and model (the learned reservation floor):
#                       llmguard:budget-floor:<name>
# Names and keys are arbitrary strings: '%' and ':' in them are percent-encoded, so no
# component contains ':' and "team:vip"/"alice" and "team"/"vip:alice" are different ledgers.
# Windows are "total" or the window's start in UTC, YYYYMMDDTHHMMSS. Keys in any other shape
# (written by llmguard before 0.x's key format change, or by something else) are skipped.
BUDGET_PREFIX = "llmguard:budget:"
CONFIG_PREFIX = "llmguard:budget-config:"
FLOOR_PREFIX = "llmguard:budget-floor:"
_WINDOW = re.compile(r"total|\d{8}T\d{6}")
_ESCAPED = re.compile(r"%(?!25|3A)")  # a '%' that does not start one of our two escapes
_ESCAPE = re.compile(r"%(25|3A)")


def encode_part(text: str) -> str:
    """``text`` as one key component: '%' and ':' percent-encoded (injective, no ':')."""
    return text.replace("%", "%25").replace(":", "%3A")


def decode_part(part: str) -> str | None:
    """The text :func:`encode_part` made ``part`` from, or None if it made no such part."""
    if ":" in part or _ESCAPED.search(part):
        return None
    return _ESCAPE.sub(lambda m: "%" if m.group(1) == "25" else ":", part)


def _key_part(key: str | None) -> str:
    return "-" if key is None else "=" + encode_part(key)


@dataclass(frozen=True)
class LedgerKey:
    """A parsed window ledger key: budget ``name``, ``key`` (None: not keyed), ``window``."""

    name: str
    key: str | None
    window: str


def ledger_key(name: str, key: str | None, window: str) -> str:
    """The storage key of budget ``name``'s ledger for ``key`` in ``window``."""
    return f"{BUDGET_PREFIX}{encode_part(name)}:{_key_part(key)}:{window}"


def ledger_prefix(name: str, key: str | None = None, *, every_key: bool = False) -> str:
    """The prefix of every window of budget ``name`` for ``key`` (ledgers and alert flags);
    with ``every_key``, of every key's."""
    prefix = f"{BUDGET_PREFIX}{encode_part(name)}:"
    return prefix if every_key else f"{prefix}{_key_part(key)}:"


def parse_ledger_key(text: str) -> LedgerKey | None:
    """The parts of a window ledger key, or None for anything else (alert flags, keys in
    the old format, foreign keys)."""
    if not text.startswith(BUDGET_PREFIX):
        return None
    parts = text[len(BUDGET_PREFIX) :].split(":")
    if len(parts) != 3 or not _WINDOW.fullmatch(parts[2]):
        return None
    name = decode_part(parts[0])
    if name is None:
        return None
    if parts[1] == "-":
        return LedgerKey(name, None, parts[2])
    key = decode_part(parts[1][1:]) if parts[1].startswith("=") else None
    return None if key is None else LedgerKey(name, key, parts[2])


def alert_key(ledger: str, threshold: float) -> str:
    """The flag that ``threshold`` has alerted in the window of ledger key ``ledger``."""
    return f"{ledger}:alert:{threshold}"


def burn_flag_key(ledger: str) -> str:
    """The flag that a spend-rate alert is firing in the window of ledger key ``ledger``."""
    return f"{ledger}:alert:burn"


def burn_key(name: str, key: str | None) -> str:
    """The storage key of budget ``name``'s recent spend per time slice for ``key``."""
    return f"{ledger_prefix(name, key)}burn"


def config_key(name: str) -> str:
    return CONFIG_PREFIX + encode_part(name)


def budget_names(storage: Storage) -> list[str]:
    """The names of the budgets whose definition ``storage`` holds, sorted."""
    names = (decode_part(k[len(CONFIG_PREFIX) :]) for k in storage.keys(CONFIG_PREFIX))
    return sorted(name for name in names if name is not None)


def read_config(storage: Storage, name: str) -> dict[str, Any] | None:
    """Budget ``name``'s stored definition, or None if there is none (or it is unreadable)."""
    raw = storage.get(config_key(name))
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def write_config(storage: Storage, name: str, record: dict[str, Any]) -> dict[str, Any] | None:
    """Store budget ``name``'s definition unless it is already the stored one; returns the
    different definition it replaced, if any."""
    stored = read_config(storage, name)
    if stored != record:
        storage.set(config_key(name), json.dumps(record, sort_keys=True).encode())
    return stored if stored is not None and stored != record else None


def clear_budget(storage: Storage, name: str, key: str | None = None) -> int:
    """Delete budget ``name``'s ledgers of every window: ``key``'s, or (key None) every
    key's and its learned cost floors; its definition stays. Returns how many records."""
    removed = storage.clear(ledger_prefix(name, key, every_key=key is None))
    if key is None:
        removed += int(storage.delete(FLOOR_PREFIX + encode_part(name)))
    return removed


def floor_field(function: str, model: str | None) -> str:
    return f"{encode_part(function)}:{'-' if model is None else '=' + encode_part(model)}"


def usd_of(pico: int) -> Decimal:
    """Pico-dollars as exact USD, without trailing zeros nor an exponent (20, not 2E+1)."""
    usd = (Decimal(pico) / PICO).normalize()
    return usd.quantize(1) if usd.as_tuple().exponent > 0 else usd  # type: ignore[operator]


class DocLedger:
    """A ledger as one JSON document per window: ``{"spent": n, "res": {id: [n, exp_ms]}}``."""

    def __init__(self, storage: LocalStorage | MemoryStorage) -> None:
        self.storage = storage

    def _load(self, key: str) -> dict[str, Any]:
        raw = self.storage.get(key)
        return json.loads(raw) if raw else {"spent": 0, "res": {}}

    @staticmethod
    def _reserved(doc: dict[str, Any], now_ms: int) -> int:
        doc["res"] = {rid: r for rid, r in doc["res"].items() if r[1] > now_ms}
        return sum(r[0] for r in doc["res"].values())

    def _store(self, key: str, doc: dict[str, Any], ttl: float | None) -> None:
        self.storage.set(key, json.dumps(doc).encode(), ttl)

    def reserve(
        self,
        key: str,
        limit: int,
        amount: int,
        rid: str,
        expires_ms: int,
        now_ms: int,
        ttl: float | None,
    ) -> tuple[bool, int, int]:
        with storage_errors(self.storage.uri, "reserve"), self.storage.atomic():
            doc = self._load(key)
            reserved = self._reserved(doc, now_ms)
            doc["limit"] = limit  # for operators reading the ledger from another process
            ok = doc["spent"] + reserved + amount <= limit
            if ok:
                doc["res"][rid] = [amount, expires_ms]
                reserved += amount
            self._store(key, doc, ttl)
            return ok, int(doc["spent"]), reserved

    def settle(
        self, key: str, rid: str | None, actual: int, now_ms: int, ttl: float | None
    ) -> tuple[int, int]:
        with storage_errors(self.storage.uri, "settle"), self.storage.atomic():
            doc = self._load(key)
            if rid is not None:
                doc["res"].pop(rid, None)
            doc["spent"] += actual
            reserved = self._reserved(doc, now_ms)
            self._store(key, doc, ttl)
            return int(doc["spent"]), reserved

    def status(self, key: str, now_ms: int) -> tuple[int, int]:
        with storage_errors(self.storage.uri, "status"), self.storage.atomic():
            doc = self._load(key)
            return int(doc["spent"]), self._reserved(doc, now_ms)

    def reset(self, key: str) -> None:
        self.storage.clear(key)

    def limit(self, key: str) -> int | None:
        with storage_errors(self.storage.uri, "status"):
            return self._load(key).get("limit")

    def _floors(self, name: str) -> dict[str, Any]:
        raw = self.storage.get(FLOOR_PREFIX + encode_part(name))
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            return {}  # not written by us: start afresh
        return doc if isinstance(doc, dict) else {}

    def floor(self, name: str, field: str) -> int | None:
        """The largest cost seen of calls ``field`` (function and model) of budget ``name``."""
        with storage_errors(self.storage.uri, "floor"):
            value = self._floors(name).get(field)
        return value if isinstance(value, int) else None

    def raise_floor(self, name: str, field: str, cost: int) -> int:
        """Make that floor at least ``cost``; returns it."""
        key = FLOOR_PREFIX + encode_part(name)
        with storage_errors(self.storage.uri, "raise floor"), self.storage.atomic():
            doc = self._floors(name)
            if not isinstance(doc.get(field), int) or doc[field] < cost:
                doc[field] = cost
                self.storage.set(key, json.dumps(doc).encode())
            return int(doc[field])

    def burn(
        self, key: str, slice_id: int, amount: int, keep_from: int, ttl: float
    ) -> dict[int, int]:
        """Add ``amount`` to time slice ``slice_id`` of the spend-rate record ``key``, forget
        slices before ``keep_from``, and return the slices kept ({slice id: pico-USD})."""
        with storage_errors(self.storage.uri, "burn"), self.storage.atomic():
            raw = self.storage.get(key)
            try:
                doc = json.loads(raw) if raw else {}
            except ValueError:
                doc = {}
            slices = {
                int(k): v
                for k, v in (doc.items() if isinstance(doc, dict) else ())
                if k.lstrip("-").isdigit() and isinstance(v, int) and int(k) >= keep_from
            }
            if amount:
                slices[slice_id] = slices.get(slice_id, 0) + amount
            self.storage.set(key, json.dumps({str(k): v for k, v in slices.items()}).encode(), ttl)
            return slices


# KEYS[1] ledger hash: field "spent" (HINCRBY, exact int64) and "r:<id>" = "<amount>:<exp_ms>".
_PRUNE = """
local function reserved(now)
  local total = 0
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 2) == 'r:' then
      local amount, expires = string.match(all[i + 1], '(%d+):(%d+)')
      if tonumber(expires) <= now then
        redis.call('HDEL', KEYS[1], all[i])
      else
        total = total + tonumber(amount)
      end
    end
  end
  return total
end
local function touch(ttl)
  if tonumber(ttl) > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
end
"""
_RESERVE = (
    _PRUNE
    + """
local limit, amount, rid = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local expires, now, ttl = ARGV[4], tonumber(ARGV[5]), ARGV[6]
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
local held = reserved(now)
redis.call('HSET', KEYS[1], 'limit', ARGV[1])
local ok = 0
if spent + held + amount <= limit then
  redis.call('HSET', KEYS[1], 'r:' .. rid, ARGV[2] .. ':' .. expires)
  held = held + amount
  ok = 1
end
touch(ttl)
return {ok, redis.call('HGET', KEYS[1], 'spent') or '0', string.format('%.0f', held)}
"""
)
_SETTLE = (
    _PRUNE
    + """
if ARGV[1] ~= '' then redis.call('HDEL', KEYS[1], 'r:' .. ARGV[1]) end
redis.call('HINCRBY', KEYS[1], 'spent', ARGV[2])
local held = reserved(tonumber(ARGV[3]))
touch(ARGV[4])
-- the stored string, exact: a Lua number (a double) prints 10^16 as "1e+16"
return {redis.call('HGET', KEYS[1], 'spent'), string.format('%.0f', held)}
"""
)
_STATUS = (
    _PRUNE
    + """
local held = reserved(tonumber(ARGV[1]))
return {redis.call('HGET', KEYS[1], 'spent') or '0', string.format('%.0f', held)}
"""
)


_BURN = """
if tonumber(ARGV[2]) > 0 then redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2]) end
local keep = tonumber(ARGV[3])
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local id = tonumber(all[i])
  if id == nil or id < keep then
    redis.call('HDEL', KEYS[1], all[i])
  else
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
if #out > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return out
"""

_RAISE_FLOOR = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '') or -1
if current < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return ARGV[2]
end
return string.format('%.0f', current)
"""


class RedisLedger:
    """The same ledger in a Redis hash, every operation one Lua script."""

    def __init__(self, storage: RedisStorage) -> None:
        self.storage = storage
        client = storage.client
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._status = client.register_script(_STATUS)
        self._raise_floor = client.register_script(_RAISE_FLOOR)
        self._burn = client.register_script(_BURN)

    @staticmethod
    def _ttl(ttl: float | None) -> int:
        return 0 if ttl is None else max(1, int(ttl * 1000))

    def reserve(
        self,
        key: str,
        limit: int,
        amount: int,
        rid: str,
        expires_ms: int,
        now_ms: int,
        ttl: float | None,
    ) -> tuple[bool, int, int]:
        with storage_errors(self.storage.uri, "reserve"):
            ok, spent, held = self._reserve(
                keys=[self.storage.key(key)],
                args=[limit, amount, rid, expires_ms, now_ms, self._ttl(ttl)],
            )
        return bool(ok), int(spent), int(held)

    def settle(
        self, key: str, rid: str | None, actual: int, now_ms: int, ttl: float | None
    ) -> tuple[int, int]:
        with storage_errors(self.storage.uri, "settle"):
            spent, held = self._settle(
                keys=[self.storage.key(key)], args=[rid or "", actual, now_ms, self._ttl(ttl)]
            )
        return int(spent), int(held)

    def status(self, key: str, now_ms: int) -> tuple[int, int]:
        with storage_errors(self.storage.uri, "status"):
            spent, held = self._status(keys=[self.storage.key(key)], args=[now_ms])
        return int(spent), int(held)

    def reset(self, key: str) -> None:
        self.storage.clear(key)

    def limit(self, key: str) -> int | None:
        with storage_errors(self.storage.uri, "status"):
            value = self.storage.client.hget(self.storage.key(key), "limit")
        return None if value is None else int(value)

    def floor(self, name: str, field: str) -> int | None:
        """The largest cost seen of calls ``field`` (function and model) of budget ``name``."""
        with storage_errors(self.storage.uri, "floor"):
            value = self.storage.client.hget(
                self.storage.key(FLOOR_PREFIX + encode_part(name)), field
            )
        return int(value) if value is not None and value.isdigit() else None

    def raise_floor(self, name: str, field: str, cost: int) -> int:
        """Make that floor at least ``cost``; returns it."""
        with storage_errors(self.storage.uri, "raise floor"):
            value = self._raise_floor(
                keys=[self.storage.key(FLOOR_PREFIX + encode_part(name))], args=[field, cost]
            )
        return int(value)

    def burn(
        self, key: str, slice_id: int, amount: int, keep_from: int, ttl: float
    ) -> dict[int, int]:
        """As :meth:`DocLedger.burn`, in one Lua script."""
        with storage_errors(self.storage.uri, "burn"):
            flat = self._burn(
                keys=[self.storage.key(key)],
                args=[slice_id, amount, keep_from, self._ttl(ttl)],
            )
        return {int(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


Ledger = DocLedger | RedisLedger


def ledger_for(storage: Storage) -> Ledger:
    if isinstance(storage, RedisStorage):
        return RedisLedger(storage)
    if isinstance(storage, (LocalStorage, MemoryStorage)):
        return DocLedger(storage)
    raise TypeError(
        f"budgets need local, memory:// or redis:// storage, not {redact_uri(storage.uri)!r}"
    )
