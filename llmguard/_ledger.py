"""Budget ledgers: spend and reservations per budget window, in integer pico-dollars.

Every operation is atomic: a reservation is taken only if spent + reserved + estimate fits
the limit, checked and written in one step, so concurrent callers cannot walk past it.
Reservations expire, so a process killed mid-call cannot hold budget forever. The local and
memory storages run the Python below inside their atomic section (an SQLite transaction for
local storage); Redis runs the same logic as Lua scripts.
"""

from __future__ import annotations

import json
from typing import Any

from ._redact import redact_uri
from ._storage import LocalStorage, MemoryStorage, RedisStorage, Storage, _wrapped

PICO = 10**12  # pico-dollars per dollar


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
        with _wrapped(self.storage.uri, "reserve"), self.storage.atomic():
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
        with _wrapped(self.storage.uri, "settle"), self.storage.atomic():
            doc = self._load(key)
            if rid is not None:
                doc["res"].pop(rid, None)
            doc["spent"] += actual
            reserved = self._reserved(doc, now_ms)
            self._store(key, doc, ttl)
            return int(doc["spent"]), reserved

    def status(self, key: str, now_ms: int) -> tuple[int, int]:
        with _wrapped(self.storage.uri, "status"), self.storage.atomic():
            doc = self._load(key)
            return int(doc["spent"]), self._reserved(doc, now_ms)

    def reset(self, key: str) -> None:
        self.storage.clear(key)

    def limit(self, key: str) -> int | None:
        with _wrapped(self.storage.uri, "status"):
            return self._load(key).get("limit")


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
local spent = redis.call('HINCRBY', KEYS[1], 'spent', ARGV[2])
local held = reserved(tonumber(ARGV[3]))
touch(ARGV[4])
return {tostring(spent), string.format('%.0f', held)}
"""
)
_STATUS = (
    _PRUNE
    + """
local held = reserved(tonumber(ARGV[1]))
return {redis.call('HGET', KEYS[1], 'spent') or '0', string.format('%.0f', held)}
"""
)


class RedisLedger:
    """The same ledger in a Redis hash, every operation one Lua script."""

    def __init__(self, storage: RedisStorage) -> None:
        self.storage = storage
        client = storage.client
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._status = client.register_script(_STATUS)

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
        with _wrapped(self.storage.uri, "reserve"):
            ok, spent, held = self._reserve(
                keys=[key], args=[limit, amount, rid, expires_ms, now_ms, self._ttl(ttl)]
            )
        return bool(ok), int(spent), int(held)

    def settle(
        self, key: str, rid: str | None, actual: int, now_ms: int, ttl: float | None
    ) -> tuple[int, int]:
        with _wrapped(self.storage.uri, "settle"):
            spent, held = self._settle(keys=[key], args=[rid or "", actual, now_ms, self._ttl(ttl)])
        return int(spent), int(held)

    def status(self, key: str, now_ms: int) -> tuple[int, int]:
        with _wrapped(self.storage.uri, "status"):
            spent, held = self._status(keys=[key], args=[now_ms])
        return int(spent), int(held)

    def reset(self, key: str) -> None:
        self.storage.clear(key)

    def limit(self, key: str) -> int | None:
        with _wrapped(self.storage.uri, "status"):
            value = self.storage.client.hget(key, "limit")
        return None if value is None else int(value)


Ledger = DocLedger | RedisLedger


def ledger_for(storage: Storage) -> Ledger:
    if isinstance(storage, RedisStorage):
        return RedisLedger(storage)
    if isinstance(storage, (LocalStorage, MemoryStorage)):
        return DocLedger(storage)
    raise TypeError(
        f"budgets need local, memory:// or redis:// storage, not {redact_uri(storage.uri)!r}"
    )
