"""State: one SQLite database (WAL, numbered migrations) and a content-addressed object store."""

from mrrp_pacs.store.database import Store
from mrrp_pacs.store.objects import ObjectStore, StoredObject, sha256_file

__all__ = ["ObjectStore", "Store", "StoredObject", "sha256_file"]
