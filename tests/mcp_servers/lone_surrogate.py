"""A stdio MCP server, written by hand, whose one tool answers with lone UTF-16 surrogate escapes.

No SDK: an SDK server cannot send such text (its JSON encoder refuses a lone surrogate),
but any other server can, e.g. a JavaScript one that cut an emoji in half. Run as
``python tests/mcp_servers/lone_surrogate.py``.
"""

from __future__ import annotations

import json
import sys

# JSON string content, escapes as written: a lone high, a pair, a lone low and a reversed pair.
SAID = r"half \ud83d, whole \ud83d\ude00, low \ude00, reversed \ude00\ud83d"
# What the engine should make of it.
HEARD = "half \ufffd, whole \U0001f600, low \ufffd, reversed \ufffd\ufffd"


def _reply(message_id: object, result: str) -> None:
    sys.stdout.write(f'{{"jsonrpc":"2.0","id":{json.dumps(message_id)},"result":{result}}}\n')
    sys.stdout.flush()


def main() -> None:
    for line in sys.stdin:
        message = json.loads(line)
        if "id" not in message:
            continue  # a notification
        method, message_id = message.get("method"), message["id"]
        if method == "initialize":
            version = json.dumps(message["params"]["protocolVersion"])
            _reply(
                message_id,
                f'{{"protocolVersion":{version},"capabilities":{{"tools":{{}}}},'
                '"serverInfo":{"name":"lone-surrogate","version":"1"}}',
            )
        elif method == "tools/list":
            _reply(
                message_id,
                '{"tools":[{"name":"say","description":"Say something with broken emoji.",'
                '"inputSchema":{"type":"object"}}]}',
            )
        elif method == "tools/call":
            _reply(message_id, f'{{"content":[{{"type":"text","text":"{SAID}"}}],"isError":false}}')
        else:
            error = '{"code":-32601,"message":"method not found"}'
            sys.stdout.write(f'{{"jsonrpc":"2.0","id":{json.dumps(message_id)},"error":{error}}}\n')
            sys.stdout.flush()


if __name__ == "__main__":
    main()
