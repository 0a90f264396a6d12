"""What a ``json:/message/chat/id`` key costs a request: the body parsed and the key's
text made (``JsonPointer.value_text(parse_body(body))``), for a webhook update of about
1 KiB in the spellings that take each path of :mod:`gateway.identity.body`.

    .venv/bin/python bench/json_keys.py                        # this checkout
    PYTHONPATH=/path/to/other/checkout .venv/bin/python bench/json_keys.py

Prints one line per body: the best of 7 runs, in microseconds a call.
"""

from __future__ import annotations

import json
import timeit
from typing import Any

from gateway.identity.body import JsonPointer, parse_body

RUNS = 7
CALLS = 2_000


def update(chat: Any, text: str) -> dict[str, Any]:
    """A Telegram-like update: one message, its sender, chat and an entity."""
    person = {
        "first_name": "Ann",
        "last_name": "Smith",
        "username": "ann_smith",
    }
    return {
        "update_id": 123456789,
        "message": {
            "message_id": 4321,
            "from": {"id": 987654321, "is_bot": False, "language_code": "en", **person},
            "chat": {"id": chat, "type": "private", **person},
            "date": 1733570000,
            "text": text,
            "entities": [{"offset": 0, "length": 5, "type": "bold"}],
        },
    }


def bodies() -> dict[str, bytes]:
    words = "hello there " * 60
    usual = json.dumps(update(987654321, words)).encode()
    many = update(987654321, "")
    many["message"]["entities"] = [{"offset": i, "length": 5, "type": "bold"} for i in range(1350)]
    big = json.dumps(many).encode()
    return {
        "usual (names once, no ':' in strings)": usual,
        "a ':' in the text (a URL)": json.dumps(
            update(987654321, words + "https://example.com")
        ).encode(),
        "chat id past 64 bits": usual.replace(
            b'"id": 987654321, "type"', b'"id": 1' + b"2" * 20 + b', "type"'
        ),
        "chat named twice": usual.replace(b'"chat": {', b'"chat": {"id": 1}, "chat": {', 1),
        # the most a client can make the gateway parse for a key: 64 KiB of small objects
        "64 KiB, usual": big,
        "64 KiB, chat named twice": big.replace(b'"chat": {', b'"chat": {"id": 1}, "chat": {', 1),
    }


def main() -> None:
    pointer = JsonPointer("/message/chat/id")
    for name, body in bodies().items():
        key = pointer.value_text(parse_body(body))

        def call(body: bytes = body) -> str | None:
            return pointer.value_text(parse_body(body))

        best = min(timeit.repeat(call, number=CALLS, repeat=RUNS))
        print(f"{name:40} {len(body):6} B  {best / CALLS * 1e6:6.2f} us  key={key}")


if __name__ == "__main__":
    main()
