"""Where records are kept: one contract (:class:`Store`), one module per backend."""

from fleetlog.store.base import LogQuery, Store, StoreUnavailable, open_store

__all__ = ["LogQuery", "Store", "StoreUnavailable", "open_store"]
