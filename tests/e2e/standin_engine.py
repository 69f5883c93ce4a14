"""A stand-in for an OpenAI-compatible engine that schedules by priority
(vLLM with `--scheduling-policy priority`, SGLang with
`--enable-priority-scheduling`), which need a GPU and cannot run on the
test machines. It answers chat completions with a fixed text and appends
each request's `priority` (null when absent) to the file `--record`, so a
test can check what strata sent; it checks the pool's API key like them.

Run by strata as an engine of kind `openai`:
    python3 standin_engine.py --host H --port P --model M --api-key K --record FILE"""
import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = None
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *_):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def authorized(self):
        if self.headers.get("authorization") != f"Bearer {args.api_key}":
            self.answer(401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
            return False
        return True

    def do_GET(self):
        if self.authorized():
            self.answer(200, {"object": "list", "data": [{"id": args.model, "object": "model"}]})

    def do_POST(self):
        if not self.authorized():
            return
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))))
        with lock, open(args.record, "a") as f:
            f.write(json.dumps({"priority": body.get("priority"), "stream": bool(body.get("stream"))}) + "\n")
        self.answer(200, {
            "id": "chatcmpl-standin", "object": "chat.completion", "created": int(time.time()),
            "model": args.model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        })


def main():
    global args
    p = argparse.ArgumentParser()
    for name in ("--host", "--port", "--model", "--api-key", "--record"):
        p.add_argument(name, required=True)
    args = p.parse_args()
    ThreadingHTTPServer((args.host, int(args.port)), Handler).serve_forever()


if __name__ == "__main__":
    main()
