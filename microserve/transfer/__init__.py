"""KV transports: how one engine writes KV rows straight into another engine's paged pool."""
from microserve.transfer.base import KVTransport, TransferError, decode_kv_addr, encode_kv_addr, make_transport

__all__ = ["KVTransport", "TransferError", "decode_kv_addr", "encode_kv_addr", "make_transport"]
