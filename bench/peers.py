"""strata's gateway against the routers users would pick instead, in one
run: wrk drives small chat completions at the nginx stub engine
(../shared/bench) directly, through strata's gateway (auth, rate limits,
budget, fair queue, routing and metering on: a key with limits far above
the load, a monthly budget, usage written to the ledger), through
vllm-router and through sglang-router (both from PyPI, round_robin over
the same one stub). Same load tool, threads and connections; runs
alternate, so the machine's noise hits all paths alike. Each run's CPU per
request is counted too, user and system apart, for wrk, the stub and the
router: on cores that all three share, that is what bounds a router's
req/s. nginx as a plain reverse proxy to the stub runs as one more path:
the floor of what relaying costs here.

Relay (`--stream-stub`): bench/stream_stub.py, a fast streaming stand-in
engine, directly and behind each router; N clients stream 256-chunk chat
completions back to back; chunks per second relayed and time to the first
chunk.

At a fixed rate (`--fixed-rate`): the same paths driven by oha at RATE
requests per second (default 10,000, below every router's saturation), 32
connections, with latency correction (a late request counts from when it
was due): the latency a router adds when it is not the bottleneck, which
wrk's saturating run cannot show (there every path's tail is the
machine's scheduling, the stub's own included). Needs oha (OHA, default
`oha` on PATH; `cargo install oha --locked`).

Mutual TLS (`--mtls`): what talking to replicas over mutual TLS costs the
gateway (issue 25's default) against plain HTTP: strata's gateway in front
of the nginx stub over plain HTTP, and in front of the same stub serving
HTTPS that requires the gateway's client certificate (a replica CA made
with openssl as strata lays it out), wrk alternating between the two; CPU
per request of the gateway and of each stub. `--mtls-streaming`: the same
two transports to one real strata engine each (plain HTTP with the replica
token; mutual TLS), N concurrent streamed completions, rounds alternating.

Streaming (`--streaming`): one strata engine replica with the real model
(release build) directly and behind each router; N concurrent streamed
completions (as ../shared/bench/stream_tokens.py counts them: chunks per
second over all streams, and mean time to the first token), rounds
alternating; what a router adds to time to first token and takes from the
tokens relayed.

Run:
  python3 -m venv /work/peers-venv && /work/peers-venv/bin/pip install vllm-router sglang-router
  PEERS_VENV=/work/peers-venv .venv/bin/python bench/peers.py [--streaming | --mtls | --mtls-streaming]
  (STRATA_BASELINE_BIN=another/strata adds that build as one more path)
Needs nginx and wrk (apt-get install nginx-light wrk) and a release build
(STRATA_BIN, default target/release/strata). The peers' venv is not part
of strata; nothing of theirs is committed.
"""
import json
import os
import re
import resource
import subprocess
import tempfile
import time

import httpx
from benchlib import SHARED, STUB, median, new_key, port, start_stub, summarize, wait, wrk

HERE = os.path.dirname(os.path.abspath(__file__))
STRATA = os.environ.get("STRATA_BIN", os.path.join(HERE, "..", "target", "release", "strata"))
PEERS = os.environ.get("PEERS_VENV", "/work/peers-venv")
DURATION, ROUNDS = os.environ.get("DURATION", "10s"), int(os.environ.get("ROUNDS", "3"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "32"))
# Another strata binary (say, a build of the commit before a change) run as
# one more path in the same rounds: the change's effect, on the same noise.
BASELINE = os.environ.get("STRATA_BASELINE_BIN")
STRATA_PATH = "strata gateway (auth, limits, budget, metering)"


def start(d, name, argv, ready, seconds=10, env=None):
    log = open(os.path.join(d, f"{name}.log"), "w")
    proc = subprocess.Popen(argv, cwd=d, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "STRATA_LOG": "warn", **(env or {})})
    wait(ready, seconds=seconds)
    return proc


def strata_gateway(d, replica=STUB, wrap=(), binary=STRATA, extra=(), env=None):
    """strata's gateway (`binary`) with everything on in front of `replica`
    (run under `wrap`, e.g. valgrind, if given); its process, base URL and
    a key of a tenant with limits and a budget far above any load."""
    d = tempfile.mkdtemp(dir=d)
    admin = new_key()
    with open(os.path.join(d, "admin.key"), "w") as f:
        f.write(admin)
    config = os.path.join(d, "strata.toml")
    with open(config, "w") as f:
        f.write(f'[security]\nadmin_key_file = "{d}/admin.key"\n[gateway]\nslots_per_replica = 64\n'
                '[pricing.stub]\nprompt_per_million = 0.1\ncompletion_per_million = 0.2\n')
    p = port()
    base = f"http://127.0.0.1:{p}"
    proc = start(d, "strata", [*wrap, binary, "--config", config, "gateway", "--replica", replica,
                               "--listen", f"127.0.0.1:{p}", "--db", os.path.join(d, "strata.db"), *extra],
                 f"{base}/health", seconds=120 if wrap else 10, env=env)
    h = {"Authorization": f"Bearer {admin}"}
    tenant = httpx.post(f"{base}/admin/v1/tenants", headers=h, timeout=60, json={
        "name": "wrk", "requests_per_minute": 100_000_000, "tokens_per_minute": 1_000_000_000,
        "monthly_budget_usd": 1_000_000.0}).json()["id"]
    key = httpx.post(f"{base}/admin/v1/tenants/{tenant}/keys", headers=h, timeout=60,
                     json={"name": "wrk", "role": "member"}).json()["key"]
    return proc, base, key


def add_baseline(paths, d, upstream, procs, route=""):
    """With STRATA_BASELINE_BIN, that build of strata's gateway in front of
    `upstream` as one more of `paths`."""
    if BASELINE:
        proc, base, key = strata_gateway(d, replica=upstream, binary=BASELINE)
        procs.append(proc)
        paths[f"strata gateway, baseline ({os.path.basename(BASELINE)})"] = (base + route, key)


def routers(d, worker, procs):
    """vllm-router and sglang-router, round_robin over `worker`; their base URLs."""
    vp, sp = port(), port()
    common = ["--worker-urls", worker, "--policy", "round_robin", "--host", "127.0.0.1",
              "--prometheus-host", "127.0.0.1"]
    procs.append(start(d, "vllm-router", [os.path.join(PEERS, "bin", "vllm-router"), *common, "--port", str(vp),
                                          "--log-level", "warning", "--prometheus-port", str(port())],
                       f"http://127.0.0.1:{vp}/health"))
    procs.append(start(d, "sglang-router", [os.path.join(PEERS, "bin", "python"), "-m", "sglang_router.launch_router",
                                            *common, "--port", str(sp), "--log-level", "warn",
                                            "--prometheus-port", str(port())], f"http://127.0.0.1:{sp}/health"))
    return f"http://127.0.0.1:{vp}", f"http://127.0.0.1:{sp}"


def stop(procs):
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def stream_probe(base, key, n, max_tokens=64):
    """Chunks per second over `n` concurrent streams, and mean seconds to the first."""
    import concurrent.futures as cf
    from openai import OpenAI
    c = OpenAI(base_url=f"{base}/v1", api_key=key or "none", max_retries=0, timeout=600)

    def one(i):
        t0, first, chunks = time.time(), None, 0
        for ch in c.completions.create(model="gemma-3-270m-q4_k_m", prompt=f"Story {i}: The history of cloud computing began",
                                       max_tokens=max_tokens, temperature=0, stream=True):
            if ch.choices and ch.choices[0].text:
                chunks += 1
                first = first if first is not None else time.time() - t0
        return chunks, first or 0.0

    t0 = time.time()
    with cf.ThreadPoolExecutor(n) as ex:
        r = list(ex.map(one, range(n)))
    wall = time.time() - t0
    return {"tokens_per_s": sum(x[0] for x in r) / wall, "ttft_s": sum(x[1] for x in r) / n}


def behind_every_router(d, upstream, direct, procs):
    """`upstream` directly (named `direct`) and behind strata's gateway,
    vllm-router and sglang-router: {path name: (base URL, key)}."""
    proc, strata, key = strata_gateway(d, replica=upstream)
    procs.append(proc)
    vllm, sglang = routers(d, upstream, procs)
    paths = {direct: (upstream, None), "strata gateway": (strata, key),
             "vllm-router": (vllm, None), "sglang-router": (sglang, None)}
    add_baseline(paths, d, upstream, procs)
    time.sleep(2)  # every router has seen the upstream healthy
    return paths


def alternate(paths, probe):
    """ROUNDS of `probe(base, key)` over every path in turn (the machine's
    noise hits all alike); prints every run, returns each path's medians."""
    runs = {name: [] for name in paths}
    for _ in range(ROUNDS):
        for name, (base, k) in paths.items():
            runs[name].append(probe(base, k))
    print(json.dumps(runs, indent=1))
    return {name: {k: median([r[k] for r in rs]) for k in rs[0]} for name, rs in runs.items()}


def streaming():
    d = tempfile.mkdtemp(prefix="strata-bench-peers-stream-")
    procs = []
    try:
        ep = port()
        engine = f"http://127.0.0.1:{ep}"
        procs.append(start(d, "engine", [STRATA, "engine", "--port", str(ep)], f"{engine}/health"))
        paths = behind_every_router(d, engine, "engine, direct", procs)
        streams = int(os.environ.get("STREAMS", "4"))
        stream_probe(engine, None, streams, 8)  # warm the engine
        med = alternate(paths, lambda base, k: stream_probe(base, k, streams))
        direct = med["engine, direct"]
        print(f"\n| path ({streams} streams, 64 tokens each) | tokens/s relayed (median) | x direct | TTFT ms (median) | added ms |")
        print("|---|---|---|---|---|")
        for name, m in med.items():
            print(f"| {name} | {m['tokens_per_s']:.1f} | x{m['tokens_per_s'] / direct['tokens_per_s']:.2f} | "
                  f"{1000 * m['ttft_s']:.0f} | {1000 * (m['ttft_s'] - direct['ttft_s']):+.0f} |")
    finally:
        stop(procs)


def main():
    d = tempfile.mkdtemp(prefix="strata-bench-peers-")
    nginx = start_stub(d)
    procs = []
    try:
        proc, strata, key = strata_gateway(d)
        procs.append(proc)
        vllm, sglang = routers(d, STUB, procs)
        time.sleep(2)  # every router has seen the stub healthy
        paths = {
            "nginx stub, direct": (f"{STUB}/v1/chat/completions", None),
            STRATA_PATH: (f"{strata}/v1/chat/completions", key),
            "vllm-router (round_robin)": (f"{vllm}/v1/chat/completions", None),
            "sglang-router (round_robin)": (f"{sglang}/v1/chat/completions", None),
        }
        add_baseline(paths, d, STUB, procs, route="/v1/chat/completions")
        # Whose CPU each path spends besides wrk's and the stub's: the router's.
        owners = {STRATA_PATH: procs[0].pid, "vllm-router (round_robin)": procs[1].pid,
                  "sglang-router (round_robin)": procs[2].pid}
        if BASELINE:
            owners[list(paths)[-1]] = procs[3].pid
        proxy, proxy_url = nginx_proxy(d)
        procs.append(proxy)
        paths[PLAIN_PROXY] = (f"{proxy_url}/v1/chat/completions", None)
        owners[PLAIN_PROXY] = proxy.pid
        runs = {name: [] for name in paths}
        for _ in range(ROUNDS):
            for name, (url, k) in paths.items():
                runs[name].append(wrk_with_cpu(url, k, nginx.pid, owners.get(name)))
        print(json.dumps(runs, indent=1))
        summary = summarize(runs)
        cpu_table(runs)
        s, v, g = (summary[n] for n in (STRATA_PATH, "vllm-router (round_robin)", "sglang-router (round_robin)"))
        print(f"\nstrata / vllm-router: req/s x{s['rps'] / v['rps']:.2f}, p99 x{s['p99'] / v['p99']:.2f}")
        print(f"strata / sglang-router: req/s x{s['rps'] / g['rps']:.2f}, p99 x{s['p99'] / g['p99']:.2f}")
        print(f"goal: req/s >= x2.00 and p99 <= x0.50 of vllm-router's")
    finally:
        stop(procs)
        nginx.terminate()


OHA = os.environ.get("OHA", "oha")
RATE = int(os.environ.get("RATE", "10000"))
# The body wrk sends (chat.lua), so that both load tools ask the same.
CHAT_BODY = re.search(r"wrk\.body = '(.*)'", open(os.path.join(SHARED, "chat.lua")).read()).group(1)


def oha(url, key):
    """oha at RATE req/s over CONNECTIONS for DURATION: achieved req/s, p50
    and p99 latency (ms) counted from when each request was due, non-2xx."""
    cmd = [OHA, "--no-tui", "--output-format", "json", "-z", DURATION, "-c", str(CONNECTIONS), "-q", str(RATE),
           "--latency-correction", "-m", "POST", "-H", "Content-Type: application/json", "-d", CHAT_BODY, url]
    if key:
        cmd[1:1] = ["-H", f"Authorization: Bearer {key}"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    codes = out.get("statusCodeDistribution", {})
    return {"rps": out["summary"]["requestsPerSec"], "p50": 1000 * out["latencyPercentiles"]["p50"],
            "p99": 1000 * out["latencyPercentiles"]["p99"],
            "errors": sum(n for code, n in codes.items() if not code.startswith("2"))}


def fixed_rate():
    d = tempfile.mkdtemp(prefix="strata-bench-peers-rate-")
    nginx = start_stub(d)
    procs = []
    try:
        paths = behind_every_router(d, STUB, "nginx stub, direct", procs)
        proxy, proxy_url = nginx_proxy(d)
        procs.append(proxy)
        paths[PLAIN_PROXY] = (proxy_url, None)
        runs = {name: [] for name in paths}
        for _ in range(ROUNDS):
            for name, (base, k) in paths.items():
                runs[name].append(oha(f"{base}/v1/chat/completions", k))
        print(json.dumps(runs, indent=1))
        print(f"\nat {RATE} req/s offered, {CONNECTIONS} connections:")
        summary = summarize(runs)
        s, v = summary["strata gateway"], summary["vllm-router"]
        print(f"\nstrata / vllm-router: p50 x{s['p50'] / v['p50']:.2f}, p99 x{s['p99'] / v['p99']:.2f}")
    finally:
        stop(procs)
        nginx.terminate()


def process_tree(pid):
    """`pid` and every process below it."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            parents.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(parents.get(p, []))
    return tree


def cpu_seconds(pid):
    """User and system CPU seconds of `pid`'s process tree so far."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for p in process_tree(pid):
        try:
            stat = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        user, system = user + int(fields[11]), system + int(fields[12])
    return user / tick, system / tick


def wrk_with_cpu(url, key, stub_pid, router_pid):
    """A wrk run (benchlib.wrk) and the CPU it cost per request, in µs, user
    and system apart: wrk's own, the stub's and the router's (if any)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    stub0 = cpu_seconds(stub_pid)
    router0 = cpu_seconds(router_pid) if router_pid else (0, 0)
    r = wrk(url, key, connections=CONNECTIONS, duration=DURATION)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stub1 = cpu_seconds(stub_pid)
    router1 = cpu_seconds(router_pid) if router_pid else (0, 0)
    n = r["rps"] * float(DURATION.rstrip("s"))
    per = lambda a, b: 1e6 * (b - a) / n  # noqa: E731
    r.update(wrk_user=per(before.ru_utime, after.ru_utime), wrk_sys=per(before.ru_stime, after.ru_stime),
             stub_user=per(stub0[0], stub1[0]), stub_sys=per(stub0[1], stub1[1]),
             router_user=per(router0[0], router1[0]), router_sys=per(router0[1], router1[1]))
    return r


def cpu_table(runs):
    """CPU per request by path (medians over rounds), and what it bounds.
    On a machine whose cores wrk, the stub and the router share, req/s is
    about cores / (CPU per request of all three): a router can only be
    faster by the CPU it saves."""
    print("\n| path | wrk µs | stub µs | router user µs | router system µs | all µs |")
    print("|---|---|---|---|---|---|")
    for name, rs in runs.items():
        m = {k: median([r[k] for r in rs]) for k in ("wrk_user", "wrk_sys", "stub_user", "stub_sys",
                                                      "router_user", "router_sys")}
        total = sum(m.values())
        print(f"| {name} | {m['wrk_user'] + m['wrk_sys']:.1f} | {m['stub_user'] + m['stub_sys']:.1f} | "
              f"{m['router_user']:.1f} | {m['router_sys']:.1f} | {total:.1f} |")


PLAIN_PROXY = "nginx as a plain reverse proxy (a floor)"


def nginx_proxy(d):
    """nginx relaying to the stub over kept-alive connections, doing nothing
    else: about the least CPU per request that any proxy on this machine's
    loopback can spend, so what bounds every router's req/s here."""
    d = tempfile.mkdtemp(dir=d)
    p = port()
    conf = os.path.join(d, "proxy.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes auto; daemon off; pid nginx.pid; error_log error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream stub {{ server {STUB.removeprefix("http://")}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{p};
    location = /health {{ return 200 'ok'; }}
    location / {{ proxy_pass http://stub; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
""")
    base = f"http://127.0.0.1:{p}"
    return start(d, "nginx-proxy", ["nginx", "-c", conf, "-p", d + "/"], f"{base}/health"), base


def relay_probe(base, key, streams, seconds, tokens=256):
    """`streams` clients streaming `tokens`-chunk chat completions back to
    back for `seconds`: chunks per second over all of them, and the mean
    time to the first chunk. Plain httpx, the same for every path."""
    import threading
    import httpx
    h = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": "stub", "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "stream": True}
    counts, firsts, end = [0] * streams, [], time.time() + seconds

    def client(i):
        with httpx.Client(timeout=60) as c:
            while time.time() < end:
                t0, first = time.time(), None
                with c.stream("POST", f"{base}/v1/chat/completions", json=body, headers=h) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {") and '"content"' in line:
                            first = first or time.time() - t0
                            counts[i] += 1
                firsts.append(first or 0.0)

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"tokens_per_s": sum(counts) / (time.time() - t0), "ttfb_s": sum(firsts) / max(1, len(firsts))}


def stream_stub():
    """The relay alone: bench/stream_stub.py (a fast streaming stand-in
    engine) directly and behind each router."""
    d = tempfile.mkdtemp(prefix="strata-bench-peers-relay-")
    procs = []
    try:
        sp = port()
        stub = f"http://127.0.0.1:{sp}"
        procs.append(start(d, "stream-stub", ["python3", os.path.join(HERE, "stream_stub.py"), str(sp)],
                           f"{stub}/health"))
        paths = behind_every_router(d, stub, "stub, direct", procs)
        streams, seconds = int(os.environ.get("STREAMS", "8")), float(os.environ.get("SECONDS", "8"))
        med = alternate(paths, lambda base, k: relay_probe(base, k, streams, seconds))
        direct = med["stub, direct"]
        print(f"\n| path ({streams} streams of 256 chunks, back to back) | chunks/s relayed | x direct "
              f"| time to first chunk ms | added ms |")
        print("|---|---|---|---|---|")
        for name, m in med.items():
            print(f"| {name} | {m['tokens_per_s']:,.0f} | x{m['tokens_per_s'] / direct['tokens_per_s']:.2f} | "
                  f"{1000 * m['ttfb_s']:.1f} | {1000 * (m['ttfb_s'] - direct['ttfb_s']):+.1f} |")
    finally:
        stop(procs)


def replica_pki(d):
    """A replica CA and its two leaves as strata lays them out (ca.pem,
    replica.pem for the name strata-replica and 127.0.0.1, gateway.pem for
    client auth), made with openssl; the directory."""
    d = os.path.join(d, "replica-tls")
    os.makedirs(d)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True, cwd=d)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca.pem", "-subj", "/CN=strata replica CA", "-days", "2")
    for leaf, usage, names in (("replica", "serverAuth", "DNS:strata-replica,IP:127.0.0.1"),
                               ("gateway", "clientAuth", "DNS:strata-gateway")):
        with open(os.path.join(d, f"{leaf}.ext"), "w") as f:
            f.write(f"subjectAltName={names}\nextendedKeyUsage={usage}\n")
        run("req", *ec, "-keyout", f"{leaf}-key.pem", "-out", f"{leaf}.csr", "-subj", f"/CN={leaf}")
        run("x509", "-req", "-in", f"{leaf}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
            "-out", f"{leaf}.pem", "-days", "2", "-extfile", f"{leaf}.ext")
    return d


def tls_stub(d, pki):
    """The nginx stub's routes over HTTPS that requires a client certificate
    from `pki`'s CA, TLS 1.3 only (what strata's engines speak; nginx 1.22
    would otherwise settle on TLS 1.2 with strata's client); its process
    and base URL."""
    d = tempfile.mkdtemp(dir=d)
    p = port()
    conf = open(os.path.join(SHARED, "stub-nginx.conf")).read()
    conf = conf.replace("listen 127.0.0.1:18001;", f"""listen 127.0.0.1:{p} ssl;
    ssl_certificate {pki}/replica.pem; ssl_certificate_key {pki}/replica-key.pem;
    ssl_client_certificate {pki}/ca.pem; ssl_verify_client on;
    ssl_protocols TLSv1.3;""")
    assert f"127.0.0.1:{p} ssl" in conf
    path = os.path.join(d, "stub-tls.conf")
    with open(path, "w") as f:
        f.write(conf)
    base = f"https://127.0.0.1:{p}"
    proc = subprocess.Popen(["nginx", "-c", path, "-p", d + "/"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import ssl
    ctx = ssl.create_default_context(cafile=f"{pki}/ca.pem")
    ctx.load_cert_chain(f"{pki}/gateway.pem", f"{pki}/gateway-key.pem")
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", verify=ctx, timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("the TLS stub did not come up")


def mtls():
    d = tempfile.mkdtemp(prefix="strata-bench-peers-mtls-")
    nginx = start_stub(d)
    pki = replica_pki(d)
    tls_nginx, tls_base = tls_stub(d, pki)
    procs = []
    try:
        plain, plain_url, plain_key = strata_gateway(d, replica=STUB)
        tls, tls_url, tls_key = strata_gateway(d, replica=tls_base, extra=("--replica-tls-dir", pki))
        procs += [plain, tls]
        time.sleep(2)
        paths = {"strata gateway -> stub, plain HTTP": (plain_url, plain_key, nginx.pid, plain.pid),
                 "strata gateway -> stub, mutual TLS": (tls_url, tls_key, tls_nginx.pid, tls.pid)}
        runs = {name: [] for name in paths}
        for _ in range(ROUNDS):
            for name, (base, k, stub_pid, router_pid) in paths.items():
                runs[name].append(wrk_with_cpu(f"{base}/v1/chat/completions", k, stub_pid, router_pid))
        print(json.dumps(runs, indent=1))
        summary = summarize(runs)
        cpu_table(runs)
        gw = {name: median([r["router_user"] + r["router_sys"] for r in rs]) for name, rs in runs.items()}
        a, b = gw.values()
        print(f"\ngateway CPU per request: plain {a:.1f} µs, mutual TLS {b:.1f} µs (x{b / a:.3f}); "
              f"req/s x{list(summary.values())[1]['rps'] / list(summary.values())[0]['rps']:.3f}")
        print("goal: mutual TLS costs under 10% more gateway CPU per request")
    finally:
        stop(procs)
        nginx.terminate()
        tls_nginx.terminate()


def mtls_streaming():
    d = tempfile.mkdtemp(prefix="strata-bench-peers-mtls-stream-")
    procs = []
    try:
        pki = replica_pki(d)
        token = new_key()
        ep, tp = port(), port()
        plain_engine, tls_engine = f"http://127.0.0.1:{ep}", f"https://127.0.0.1:{tp}"
        procs.append(start(d, "engine-plain", [STRATA, "engine", "--port", str(ep)], f"{plain_engine}/health",
                           seconds=120, env={"STRATA_REPLICA_TOKEN": token}))
        procs.append(start(d, "engine-tls", [STRATA, "engine", "--port", str(tp), "--tls-cert", f"{pki}/replica.pem",
                                             "--tls-key", f"{pki}/replica-key.pem", "--client-ca", f"{pki}/ca.pem"],
                           f"http://127.0.0.1:{tp}/health", seconds=120))  # plain HTTP: its one 400, when listening
        time.sleep(5)  # its model loads
        plain, plain_url, plain_key = strata_gateway(d, replica=plain_engine, env={"STRATA_REPLICA_TOKEN": token})
        tls, tls_url, tls_key = strata_gateway(d, replica=tls_engine, extra=("--replica-tls-dir", pki))
        procs += [plain, tls]
        time.sleep(3)
        paths = {"strata gateway -> engine, plain HTTP + token": (plain_url, plain_key),
                 "strata gateway -> engine, mutual TLS": (tls_url, tls_key)}
        streams = int(os.environ.get("STREAMS", "4"))
        for base, k in paths.values():
            stream_probe(base, k, streams, 8)  # warm both engines, both paths
        med = alternate(paths, lambda base, k: stream_probe(base, k, streams))
        (pn, p), (tn, t) = med.items()
        print(f"\n| path ({streams} streams, 64 tokens each) | tokens/s relayed (median) | TTFT ms (median) |")
        print("|---|---|---|")
        for name, m in med.items():
            print(f"| {name} | {m['tokens_per_s']:.1f} | {1000 * m['ttft_s']:.0f} |")
        print(f"\nmutual TLS / plain: tokens/s x{t['tokens_per_s'] / p['tokens_per_s']:.3f}, "
              f"TTFT {1000 * (t['ttft_s'] - p['ttft_s']):+.0f} ms")
    finally:
        stop(procs)


if __name__ == "__main__":
    import sys
    if "--mtls" in sys.argv:
        mtls()
    elif "--mtls-streaming" in sys.argv:
        mtls_streaming()
    elif "--fixed-rate" in sys.argv:
        fixed_rate()
    elif "--streaming" in sys.argv:
        streaming()
    elif "--stream-stub" in sys.argv:
        stream_stub()
    else:
        main()
