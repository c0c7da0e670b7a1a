"""The Python side of canal's channels_redis interop tests (real channels_redis on real Redis).

Usage: interop.py HOSTS [--key K]... COMMAND [ARGS]
  HOSTS       comma-separated redis:// URLs (the shard ring, in order)
  group_send GROUP TEXT     group_send {"type": "chat.message", "text": TEXT}
  send CHANNEL              send the RICH message (below) to CHANNEL
  receive_new               print a new channel name, then print what arrives on it (typed JSON)
Values are printed with their Python types so the Rust side can check str vs bytes and friends.
"""
import asyncio
import json
import sys

from channels_redis.core import RedisChannelLayer

RICH = {
    "type": "interop.rich",
    "text": "héllo ✓",
    "bytes": b"\x00\x01\xff",
    "big": 2**40,
    "neg": -3,
    "f": 1.5,
    "t": True,
    "none": None,
    "nested": {"l": [1, "a", None, b"\x02"], "m": {"k": "v"}},
}


def typed(v):
    if v is None:
        return {"t": "none"}
    if isinstance(v, bool):
        return {"t": "bool", "v": v}
    if isinstance(v, int):
        return {"t": "int", "v": v}
    if isinstance(v, float):
        return {"t": "float", "v": v}
    if isinstance(v, str):
        return {"t": "str", "v": v}
    if isinstance(v, bytes):
        return {"t": "bytes", "v": list(v)}
    if isinstance(v, (list, tuple)):
        return {"t": "list", "v": [typed(x) for x in v]}
    if isinstance(v, dict):
        return {"t": "dict", "v": {k: typed(x) for k, x in v.items()}}
    return {"t": type(v).__name__}


async def main(argv):
    hosts = argv[0].split(",")
    argv = argv[1:]
    keys = []
    while argv and argv[0] == "--key":
        keys.append(argv[1])
        argv = argv[2:]
    kwargs = {"hosts": hosts}
    if keys:
        kwargs["symmetric_encryption_keys"] = keys
    layer = RedisChannelLayer(**kwargs)
    command, args = argv[0], argv[1:]
    if command == "group_send":
        await layer.group_send(args[0], {"type": "chat.message", "text": args[1]})
    elif command == "send":
        await layer.send(args[0], RICH)
    elif command == "receive_new":
        name = await layer.new_channel()
        print(name, flush=True)
        message = await asyncio.wait_for(layer.receive(name), timeout=20)
        print(json.dumps(typed(message)), flush=True)
    else:
        raise SystemExit(f"unknown command {command}")
    await layer.close_pools()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
