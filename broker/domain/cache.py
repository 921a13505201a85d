"""A bounded in-memory cache of stored integrations for the GetAccessToken hot path.

It holds ciphertexts, never plaintext (a decrypt costs microseconds). Correctness rules:

- every write this process makes invalidates the entry itself; writes by other replicas arrive
  as PostgreSQL notifications (``broker.storage.notify``) and invalidate it too;
- while the notification channel is down the cache is flushed and bypassed: a replica that
  cannot hear about writes must not answer from memory;
- on SQLite, other processes' writes (the CLI) are read from the change log before each
  lookup (``before_read``);
- a read that raced a write must not put its stale row back: ``put`` takes the invalidation
  sequence number seen *before* the database read and refuses to store if the entry was
  invalidated after it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from broker.model import Selector, StoredIntegration

OwnerKey = tuple[str, str]  # (user_id, provider)


class IntegrationCache:
    def __init__(self, max_entries: int, *, enabled: bool = True, available: bool = True) -> None:
        self.max_entries = max_entries
        self.enabled = enabled
        # False while invalidations cannot be heard (LISTEN connection down).
        self.available = available
        self._by_id: OrderedDict[str, StoredIntegration] = OrderedDict()
        # (user, provider) -> {account_id or None: integration id}
        self._owners: dict[OwnerKey, dict[str | None, str]] = {}
        self._seq = 0
        # Sequence number of the latest invalidation per key, for the keys invalidated lately;
        # older ones are summarised by _floor.
        self._invalidated: OrderedDict[str, int] = OrderedDict()
        self._floor = 0
        self.hits = 0
        self.misses = 0
        # Set on SQLite: hears other processes' commits before each lookup
        # (``broker.storage.changes``).
        self.before_read: Callable[[], None] | None = None

    @property
    def active(self) -> bool:
        return self.enabled and self.available

    @property
    def seq(self) -> int:
        return self._seq

    def __len__(self) -> int:
        return len(self._by_id)

    # -- reads -----------------------------------------------------------------------------

    def get(self, sel: Selector, provider: str) -> StoredIntegration | None:
        if not self.active:
            return None
        if self.before_read is not None:
            self.before_read()
        iid: str | None
        if sel.integration_id:
            iid = sel.integration_id
        else:
            iid = self._owners.get((sel.user_id, provider), {}).get(sel.account_id)
        stored = self._by_id.get(iid) if iid is not None else None
        if stored is None:
            self.misses += 1
            return None
        self._by_id.move_to_end(stored.integration.id)
        self.hits += 1
        return stored

    def put(self, sel: Selector, stored: StoredIntegration, seen_seq: int) -> None:
        if not self.active:
            return
        integration = stored.integration
        for key in (integration.id, _owner_token(integration.user_id, integration.provider)):
            if self._invalidated.get(key, self._floor) > seen_seq:
                return  # a write landed while we were reading: our row may be stale
        self._by_id[integration.id] = stored
        self._by_id.move_to_end(integration.id)
        if not sel.integration_id:
            owners = self._owners.setdefault((integration.user_id, integration.provider), {})
            owners[sel.account_id] = integration.id
        while len(self._by_id) > self.max_entries:
            _, old = self._by_id.popitem(last=False)
            self._drop_owner(old)

    # -- invalidation ----------------------------------------------------------------------

    def invalidate(self, integration_id: str, user_id: str = "", provider: str = "") -> None:
        """Forget one integration (and, given its owner, every lookup by owner that could now
        resolve differently, e.g. when a second account makes a lookup ambiguous)."""
        self._seq += 1
        self._mark(integration_id)
        old = self._by_id.pop(integration_id, None)
        if old is not None:
            self._drop_owner(old)
        if user_id and provider:
            self._mark(_owner_token(user_id, provider))
            self._owners.pop((user_id, provider), None)

    def flush(self) -> None:
        self._seq += 1
        self._floor = self._seq
        self._invalidated.clear()
        self._by_id.clear()
        self._owners.clear()

    def _mark(self, key: str) -> None:
        self._invalidated[key] = self._seq
        self._invalidated.move_to_end(key)
        while len(self._invalidated) > 4 * self.max_entries + 1024:
            _, seq = self._invalidated.popitem(last=False)
            self._floor = max(self._floor, seq)

    def _drop_owner(self, stored: StoredIntegration) -> None:
        integration = stored.integration
        owners = self._owners.get((integration.user_id, integration.provider))
        if owners is None:
            return
        for account, iid in list(owners.items()):
            if iid == integration.id:
                del owners[account]
        if not owners:
            del self._owners[(integration.user_id, integration.provider)]


def _owner_token(user_id: str, provider: str) -> str:
    return f"\x1f{user_id}\x1f{provider}"
