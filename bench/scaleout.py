#!/usr/bin/env python3
"""Scale-out benchmark: N Marga instances sharing one Postgres (standard library only).

    cargo build --release -p marga-gateway -p mock-upstream
    python3 bench/scaleout.py [--instances 3] [--duration 10] [--connections 32]

Creates a fresh Postgres database (psql, trust auth on 127.0.0.1:5432 by default), starts
one mock upstream and N `marga serve --database-url …` instances, creates one organisation
with credit and one standard inference key, then in the same run measures:

  one      wrk against instance 1 alone (the others idle): requests/s, CPU µs/request
  all      one wrk per instance at the same time: total requests/s, CPU µs/request
  money    after the load: the ledger's charges equal what the clients were told
           (`usage.cost` summed over a sample), every answered request has exactly one
           charge, the balance never went below zero, no open reservation is left behind

and, for comparison, `direct` (wrk against the mock). Every instance runs the whole path:
key auth, global rate-limit claims, credit leases, ledger charges, request log.
Prints a Markdown report; BENCHMARKS.md records runs by hand.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from decimal import ROUND_CEILING, Decimal
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench as b  # noqa: E402  (shared helpers: processes, wrk, /proc)


def psql(admin_url, sql):
    subprocess.run(["psql", admin_url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql], check=True)


def query(url, sql):
    out = subprocess.run(["psql", url, "-At", "-c", sql], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def config(mock):
    price = 'input_per_mtok = "0.15", output_per_mtok = "0.60", currency = "USD"'
    return "\n".join([
        "[limits]", "default_key_rpm = 0", "",
        "[providers.mock]", 'kind = "openai"', f'base_url = "{mock}/v1"', 'api_key = "x"', 'region = "US"', "",
        '[models."bench/chat"]', f'routes = [{{ provider = "mock", model = "m", {price} }}]', "",
    ])


def start_instance(i, tmp, cfg, database_url, logdir):
    data = tmp / f"marga{i}-data"
    data.mkdir()
    port = b.free_port()
    # Every instance needs the same secrets key on a shared Postgres.
    env = dict(os.environ, MARGA_MASTER_KEY=b.MASTER_KEY, RUST_LOG="warn", MARGA_SECRETS_KEY="2a" * 32)
    cmd = [str(b.BIN / "marga"), "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data),
           "--config", str(cfg), "--database-url", database_url]
    p = b.track(subprocess.Popen(cmd, env=env, stdout=open(logdir / f"marga{i}.log", "w"), stderr=subprocess.STDOUT))
    url = f"http://127.0.0.1:{port}"
    b.wait_http(url + "/health")
    return p, url


def load(targets, body, auth, seconds, conns):
    """One wrk per target, all at once; returns (results, CPU ticks used per pid)."""
    pids = [pid for _, pid in targets]
    before = {pid: b.cpu_ticks([pid]) for pid in pids}
    env = dict(os.environ, BENCH_BODY=str(body), BENCH_AUTH=auth)
    procs = [subprocess.Popen(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s",
                               "-s", str(HERE / "wrk.lua"), url], env=env, stdout=subprocess.PIPE, text=True)
             for url, _ in targets]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 60)
        line = next((l for l in out.splitlines() if l.startswith("WRKJSON ")), None)
        if line is None:
            raise SystemExit(f"wrk failed: {out}")
        results.append(json.loads(line[8:]))
    used = {pid: b.cpu_ticks([pid]) - before[pid] for pid in pids}
    return results, used


def summary(name, results, used, instances):
    requests = sum(r["requests"] for r in results)
    seconds = max(r["duration_us"] for r in results) / 1e6
    errors = sum(r["err_status"] + r["err_timeout"] + r["err_connect"] + r["err_read"] for r in results)
    ticks = sum(used.values())
    cpu_us = ticks / b.CLK_TCK * 1e6 / requests if requests else 0
    p50 = max(r["lat_p50_us"] for r in results)
    p99 = max(r["lat_p99_us"] for r in results)
    return {"name": name, "instances": instances, "rps": requests / seconds, "requests": requests,
            "errors": errors, "cpu_us_per_req": cpu_us, "p50_us": p50, "p99_us": p99}


def money_check(database_url, key, instances_urls, n):
    """`n` sequential requests spread over the instances: the costs the clients were told,
    summed exactly, must equal what the ledger charged for those generations."""
    told = 0
    ids = []
    body = json.dumps({"model": "bench/chat", "messages": [{"role": "user", "content": b.PROMPT}]}).encode()
    for i in range(n):
        base = instances_urls[i % len(instances_urls)]
        req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            answer = json.loads(r.read(), parse_float=Decimal)
        ids.append(answer["id"])
        # The ledger keeps nanos, rounded up (as the gateway charges).
        told += int((Decimal(answer["usage"]["cost"]) * 10**9).to_integral_value(ROUND_CEILING))
    time.sleep(1.5)  # the ledger writers' commit window
    id_list = ",".join(f"'{i}'" for i in ids)
    charged = int(query(database_url, f"SELECT COALESCE(-SUM(amount_nanos),0) FROM ledger_entries "
                                      f"WHERE kind='charge' AND reference IN ({id_list})"))
    lines = int(query(database_url, f"SELECT COUNT(*) FROM ledger_entries WHERE kind='charge' AND reference IN ({id_list})"))
    return {"requests": n, "charge_lines": lines, "told_nanos": told, "charged_nanos": charged}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32, help="per wrk (one wrk per instance)")
    ap.add_argument("--admin-url", default="postgres://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args()

    import atexit
    atexit.register(b.cleanup)
    tmp = Path(tempfile.mkdtemp(prefix="marga-scaleout-"))
    name = f"marga_scaleout_{uuid.uuid4().hex[:8]}"
    psql(args.admin_url, f"CREATE DATABASE {name}")
    database_url = args.admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        run(args, tmp, database_url)
    finally:
        b.cleanup()
        psql(args.admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def run(args, tmp, database_url):
    mock_proc, mock = b.start_mock(0, "", tmp, "mock")
    cfg = tmp / "marga.toml"
    cfg.write_text(config(mock))
    instances = [start_instance(i + 1, tmp, cfg, database_url, tmp) for i in range(args.instances)]
    urls = [url for _, url in instances]
    org = b.api(urls[0] + "/admin/orgs", b.MASTER_KEY, {"name": "bench", "currency": "USD"})
    b.api(urls[0] + f"/admin/orgs/{org['id']}/credits", b.MASTER_KEY, {"amount": "1000000000"})
    key = b.api(urls[0] + "/v1/keys", org["management_key"], {"name": "bench"})["key"]
    time.sleep(1.5)  # every instance's account cache has the key
    body_marga = tmp / "body-marga.json"
    body_marga.write_text(json.dumps({"model": "bench/chat", "messages": [{"role": "user", "content": b.PROMPT}]}))
    body_up = tmp / "body-up.json"
    body_up.write_text(json.dumps({"model": "m", "messages": [{"role": "user", "content": b.PROMPT}]}))
    auth = f"Bearer {key}"
    rows = []
    for target in [u + "/v1/chat/completions" for u in urls]:  # warm-up: pools, leases, claims
        load([(target, instances[0][0].pid)], body_marga, auth, 2, args.connections)
    direct, used = load([(mock + "/v1/chat/completions", mock_proc.pid)], body_up, auth, args.duration, args.connections)
    rows.append(summary("direct (wrk → mock)", direct, used, 0))
    one, used = load([(urls[0] + "/v1/chat/completions", instances[0][0].pid)], body_marga, auth, args.duration, args.connections)
    rows.append(summary("one instance", one, used, 1))
    targets = [(url + "/v1/chat/completions", p.pid) for p, url in instances]
    every, used = load(targets, body_marga, auth, args.duration, args.connections)
    rows.append(summary(f"all {args.instances} instances at once", every, used, args.instances))
    money = money_check(database_url, key, urls, 60)
    balance = b.api(urls[0] + "/v1/credits", org["management_key"])["data"]
    negative = query(database_url, f"SELECT COUNT(*) FROM (SELECT SUM(amount_nanos) s FROM ledger_entries "
                                   f"WHERE org_id='{org['id']}') t WHERE s < 0")
    report(args, rows, money, balance, negative)


def report(args, rows, money, balance, negative):
    print(f"\n## Scale-out: {args.instances} instances on one Postgres\n")
    print(f"wrk -t1 -c{args.connections} -d{args.duration}s per target; CPU is the instances' own (utime+stime).\n")
    print("| target | req/s | errors | p50 µs | p99 µs | Marga CPU µs/req |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cpu = f"{r['cpu_us_per_req']:.1f}" if r["instances"] else "–"
        print(f"| {r['name']} | {r['rps']:,.0f} | {r['errors']} | {r['p50_us']:,} | {r['p99_us']:,} | {cpu} |")
    ok = money["charge_lines"] == money["requests"] and money["told_nanos"] == money["charged_nanos"]
    print(f"\nMoney: {money['requests']} requests spread over the instances → {money['charge_lines']} charge lines; "
          f"told {money['told_nanos']} nanos, charged {money['charged_nanos']} nanos → {'exact' if ok else 'MISMATCH'}. "
          f"Balance after the run: {balance['total_credits']} credited, {balance['total_usage']} used; "
          f"negative balance: {'no' if negative == '0' else 'YES'}.")
    if not ok or negative != "0":
        sys.exit(1)


if __name__ == "__main__":
    main()
