"""Where records are kept: one contract (:class:`Store`), one module per backend."""

from fleetlog.store.base import (
    LogQuery,
    ReadLimit,
    RecordRejected,
    Store,
    StoreMissing,
    StoreUnavailable,
    VolumeBucket,
    open_store,
)

__all__ = ["LogQuery", "ReadLimit", "RecordRejected", "Store", "StoreMissing", "StoreUnavailable",
           "VolumeBucket", "open_store"]
