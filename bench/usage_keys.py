"""Why the ledger's request ids are ordered by time: SQLite (as strata
opens it: WAL, synchronous=NORMAL) inserting usage rows in 1000-row
transactions, as the ledger writes them, into the usage table's schema
with random (UUIDv4) or time-ordered (UUIDv7-like) request ids, with and
without the (model, at_ms) index dropped in migration 0009.

Run: python3 bench/usage_keys.py [BATCHES]   (300 batches = 300,000 rows each)
Prints the mean time per batch over the whole run for each variant.
"""
import os
import sqlite3
import sys
import tempfile
import time
import uuid

COLUMNS = ("request_id, at_ms, model, replica, status, prompt_tokens, completion_tokens, ttft_ms, "
           "latency_ms, stream, tenant_id, key_id, cost_usd")


def run(d, ordered, model_index, batches, batch=1000):
    c = sqlite3.connect(os.path.join(d, f"{ordered}-{model_index}.db"), isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=NORMAL")
    c.execute("CREATE TABLE usage (request_id TEXT PRIMARY KEY, at_ms INTEGER NOT NULL, model TEXT NOT NULL, "
              "replica TEXT NOT NULL, status INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, "
              "completion_tokens INTEGER NOT NULL, ttft_ms REAL NOT NULL, latency_ms REAL NOT NULL, "
              "stream INTEGER NOT NULL, tenant_id TEXT NOT NULL, key_id TEXT NOT NULL, cost_usd REAL NOT NULL)")
    if model_index:
        c.execute("CREATE INDEX usage_by_model_time ON usage (model, at_ms)")
    c.execute("CREATE INDEX usage_by_tenant_time ON usage (tenant_id, at_ms)")
    c.execute("CREATE INDEX usage_by_time ON usage (at_ms)")
    ms, spent = int(time.time() * 1000), 0.0
    for _ in range(batches):
        rows = []
        for i in range(batch):
            ms += i % 20 == 0  # 20 requests a millisecond
            rid = f"{ms:012x}{uuid.uuid4().hex[:20]}" if ordered else uuid.uuid4().hex
            rows.append((f"req-{rid}", ms, "gemma", "r1", 200, 12, 8, 1.0, 2.0, 0, f"t{i % 3}", f"k{i % 3}", 1e-4))
        t0 = time.perf_counter()
        c.execute("BEGIN")
        c.executemany(f"INSERT INTO usage ({COLUMNS}) VALUES ({', '.join('?' * 13)}) "
                      "ON CONFLICT (request_id) DO NOTHING", rows)
        c.execute("COMMIT")
        spent += time.perf_counter() - t0
    c.close()
    return spent / batches * 1000


def main():
    batches = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    with tempfile.TemporaryDirectory() as d:
        print(f"| request ids | (model, at_ms) index | ms per 1000-row batch, mean of {batches} |")
        print("|---|---|---|")
        for ordered in (False, True):
            for model_index in (True, False):
                ms = run(d, ordered, model_index, batches)
                print(f"| {'time-ordered' if ordered else 'random'} | {'yes' if model_index else 'no'} | {ms:.1f} |")


if __name__ == "__main__":
    main()
