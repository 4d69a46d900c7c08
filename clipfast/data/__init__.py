"""Data: webdataset shards -> DALI -> batches on the training device (see loader.py).

DaliLoader and pack_text load on first use (PEP 562): the shard tools (make_shards, demo) need neither torch nor
DALI, whose imports took 1.1 of make_shards' 1.5 s start-up.
"""
from clipfast.data.shards import ShardReader, list_shards, write_shard

__all__ = ["DaliLoader", "ShardReader", "list_shards", "pack_text", "write_shard"]


def __getattr__(name: str):
    if name in ("DaliLoader", "pack_text"):
        from clipfast.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'clipfast.data' has no attribute {name!r}")
