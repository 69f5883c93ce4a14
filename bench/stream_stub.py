"""A fast streaming stand-in engine for relay benchmarks: answers
`/v1/chat/completions` and `/v1/completions` at once, and with `stream`
sends `max_tokens` one-token chunks (chunked SSE, no delay), a finish
chunk, a usage chunk when `stream_options.include_usage` asks, and
`[DONE]`; `/health` and `/v1/models` as an engine does. One process,
asyncio, HTTP/1.1 keep-alive. What a router adds per token shows against
this, where a real CPU engine's own pace hides it.

Run: python3 bench/stream_stub.py PORT
"""
import asyncio
import json
import sys

MODEL = "stub"


def chunk(kind, delta=None, finish=None, usage=None):
    if usage is not None:
        return {"id": "cmpl-stub", "object": kind, "created": 0, "model": MODEL, "choices": [], "usage": usage}
    if kind == "text_completion":
        choice = {"index": 0, "text": delta or "", "finish_reason": finish}
    else:
        choice = {"index": 0, "delta": {"content": delta} if delta is not None else {}, "finish_reason": finish}
    return {"id": "cmpl-stub", "object": kind, "created": 0, "model": MODEL, "choices": [choice]}


def events(path, req):
    kind = "text_completion" if path.endswith("/completions") and "chat" not in path else "chat.completion.chunk"
    n = max(1, int(req.get("max_tokens") or 16))
    token = json.dumps(chunk(kind, " tok")).encode()
    frame = b"data: " + token + b"\n\n"
    out = [frame] * n
    out.append(b"data: " + json.dumps(chunk(kind, finish="length")).encode() + b"\n\n")
    if (req.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
        out.append(b"data: " + json.dumps(chunk(kind, usage=usage)).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path = lines[0].split(" ")[:2]
            headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if path == "/health":
                payload, ctype = b"ok", b"text/plain"
            elif path == "/v1/models":
                payload = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()
                ctype = b"application/json"
            elif method == "POST":
                req = json.loads(body or b"{}")
                if req.get("stream"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")
                    for e in events(path, req):
                        writer.write(b"%x\r\n%s\r\n" % (len(e), e))
                        await writer.drain()
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    continue
                n = int(req.get("max_tokens") or 16)
                payload = json.dumps({"id": "cmpl-stub", "object": "chat.completion", "created": 0, "model": MODEL,
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": " tok" * n},
                                                   "finish_reason": "length"}],
                                      "usage": {"prompt_tokens": 5, "completion_tokens": n,
                                                "total_tokens": 5 + n}}).encode()
                ctype = b"application/json"
            else:
                payload, ctype = b"{}", b"application/json"
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                         % (ctype, len(payload), payload))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port):
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
