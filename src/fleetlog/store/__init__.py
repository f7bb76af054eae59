"""Where records are kept: one contract (:class:`Store`), one module per backend.

:mod:`fleetlog.store.base` is the contract, :mod:`fleetlog.store.core` the
rules every SQL backend shares (columns, rows, the query's WHERE, device
stats, the schema check), and :mod:`fleetlog.store.sqlite` and
:mod:`fleetlog.store.postgres` the two dialects.  :func:`open_store` picks
one by URL; it lives here, above the backends, so that nothing below imports
upwards.
"""

from fleetlog.errors import UnsupportedStore
from fleetlog.store.base import (
    LogQuery,
    ReadLimit,
    RecordRejected,
    Store,
    StoreMissing,
    StoreUnavailable,
    VolumeBucket,
)

__all__ = ["LogQuery", "ReadLimit", "RecordRejected", "Store", "StoreMissing", "StoreUnavailable",
           "UnsupportedStore", "VolumeBucket", "open_store"]


def open_store(url: str, *, readonly: bool = False) -> Store:
    """Open the store a URL names; :class:`UnsupportedStore` when it names none.

    ``sqlite:///PATH`` is relative to the working directory and
    ``sqlite:////PATH`` absolute, as in SQLAlchemy.  ``postgresql://`` (or
    ``postgres://``) is a libpq URL: what it leaves out (password, TLS) comes
    from the ``PG*`` environment variables.
    """
    if url.startswith("sqlite:///"):
        from fleetlog.store.sqlite import SQLiteStore

        return SQLiteStore(url.removeprefix("sqlite:///"), readonly=readonly)
    if url.startswith(("postgresql://", "postgres://")):
        from fleetlog.store.postgres import PostgresStore

        return PostgresStore(url, readonly=readonly)
    raise UnsupportedStore(
        f"unsupported store URL {url!r}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
    )
