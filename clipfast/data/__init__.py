"""Data: webdataset shards -> DALI -> batches on the training device (see loader.py)."""
from clipfast.data.loader import DaliLoader, pack_text
from clipfast.data.shards import ShardReader, list_shards, write_shard

__all__ = ["DaliLoader", "ShardReader", "list_shards", "pack_text", "write_shard"]
