"""Load on `mellum2 serve`: concurrent streaming clients against the real server, and the repeated
growing-file completion workload with and without the prefix cache, all in one run.

    .venv/bin/python benchmarks/serve_load.py                        # random weights of --config tiny
    .venv/bin/python benchmarks/serve_load.py --model runs/tiny      # a checkpoint (run or checkpoint dir)
    .venv/bin/python benchmarks/serve_load.py --config benchmarks/configs/moe64.json   # another shape

1. Mixed load: --clients (32) concurrent clients stream --clients x --requests (3) greedy completions
   from one shared queue, each taking the next request when its last one ends, so 32 streams stay in
   flight until the queue runs dry (as vLLM's benchmark_serving with --max-concurrency; `--queue
   per-client`: each client streams its own 3 requests, and the batch thins out as clients finish),
   `ignore_eos` (every request produces exactly its budget), with prompt lengths drawn from
   --prompt-lens and output lengths from --output-lens. The same workload (same seeds) is served three
   ways, each by a fresh `mellum2 serve` process on this machine:
     continuous  the scheduler, --max-num-seqs = clients (requests join and leave the batch per step)
     static      --batching static: batches of up to max-num-seqs run to their end, newcomers wait
     serial      --max-num-seqs 1: one request at a time
   Reported per way: throughput (completion tokens / wall time), time to first token p50/p99,
   inter-token latency (gap between stream chunks) p50/p99, errors, and whether every stream's text
   equals the same request served alone (the serial run). The ratios continuous/serial and
   continuous/static are the point.
2. Growing file: one client sends --file-requests completions of a file that grows by a few tokens
   each time (an IDE asking again at every keystroke), --file-tokens long at the start; time to first
   token with the prefix cache on and off (--prefix-cache-tokens 0), and whether the completions match.

The last stdout line is one JSON object. Timing is wall clock (a server is a wall-clock thing), and
throughput is also given per CPU second of the server process (/proc: user + system time of all its
threads), which time spent descheduled by other jobs on a shared machine does not inflate.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mellum2 import Mellum2, ModelConfig  # noqa: E402
from mellum2.locate import resolve_model_dir, tokenizer_dir  # noqa: E402
from mellum2.tokenizer import Tokenizer, train_bpe  # noqa: E402

TEXTS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
         "class Stack:\n    def push(self, x):\n        self.items.append(x)\n", "The answer is 42.\n"] * 30


def random_checkpoint(config: str, out: Path, context: int) -> Path:
    tok = train_bpe(TEXTS, 400)
    torch.manual_seed(0)
    cfg = ModelConfig.from_spec(config).replace(vocab_size=tok.vocab_size, max_position_embeddings=context)
    Mellum2(cfg).eval().save_pretrained(out)
    tok.save(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mellum2 serve` in a subprocess, started and stopped around a workload."""

    def __init__(self, model: Path, flags: list[str], threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([sys.executable, "-m", "mellum2.cli", "serve", "--model", str(model), "--port",
                                      str(self.port), "--threads", str(threads), "--log-level", "warning",
                                      "--served-model-name", "bench", *flags],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> "Server":
        t0 = time.time()
        while time.time() - t0 < 300:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not start in 300 s")

    def cpu_s(self) -> float:
        """CPU seconds the server has used (user + system, all threads of its process and of the
        processes it started: the engine process)."""
        total, todo = 0, [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
                for t in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (t / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue  # a process that ended meanwhile
        return total / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streaming completion: text, TTFT, chunk gaps, completion tokens, error."""
    t0 = time.perf_counter()
    out = {"text": "", "ttft": None, "gaps": [], "tokens": 0, "error": None}
    last = None
    try:
        async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True,
                                                                         "stream_options": {"include_usage": True}}) as r:
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                j = json.loads(line[6:])
                if "error" in j:
                    out["error"] = j["error"]["message"]
                    continue
                if j.get("usage"):
                    out["tokens"] = j["usage"]["completion_tokens"]
                for c in j.get("choices", []):
                    if c.get("text"):
                        now = time.perf_counter()
                        if out["ttft"] is None:
                            out["ttft"] = now - t0
                        else:
                            out["gaps"].append(now - last)
                        last = now
                        out["text"] += c["text"]
    except httpx.HTTPError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def workload(args, vocab: int, bos: int) -> list[list[dict]]:
    """Per client, its requests (token-id prompts, so lengths are exact)."""
    rng = random.Random(args.seed)
    plens = [int(x) for x in args.prompt_lens.split(",")]
    olens = [int(x) for x in args.output_lens.split(",")]
    return [[{"model": "bench", "prompt": [bos] + [rng.randrange(33, vocab) for _ in range(rng.choice(plens) - 1)],
              "max_tokens": rng.choice(olens), "temperature": 0, "ignore_eos": True}
             for _ in range(args.requests)] for _ in range(args.clients)]


async def run_load(url: str, plan: list[list[dict]], queue: str = "shared") -> dict:
    """The clients stream their requests concurrently. queue "shared": every client takes the next
    request of one queue (all clients' lists, in order) when its last one ends, so len(plan) streams
    stay in flight until the queue runs dry (vLLM's benchmark_serving with --max-concurrency);
    "per-client": each client streams its own list, so a client with short requests goes idle early."""
    limits = httpx.Limits(max_connections=len(plan) + 4, max_keepalive_connections=len(plan) + 4)
    bodies = [b for rs in plan for b in rs]
    flat: list = [None] * len(bodies)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        if queue == "shared":
            todo = iter(range(len(bodies)))
            groups = [todo] * len(plan)
        else:
            ends = [sum(map(len, plan[:c + 1])) for c in range(len(plan))]
            groups = [iter(range(e - len(plan[c]), e)) for c, e in enumerate(ends)]

        async def one_client(ids):
            for i in ids:  # a shared iterator hands each index to one client only
                flat[i] = await stream_one(client, url, bodies[i])

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(g) for g in groups))
        wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in flat if r["ttft"] is not None]
    gaps = [g for r in flat for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in flat)
    want = [b["max_tokens"] for rs in plan for b in rs]
    complete = sum(r["error"] is None and r["tokens"] == w for r, w in zip(flat, want))
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "ttft_p50": pct(ttft, 50),
            "ttft_p99": pct(ttft, 99), "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99),
            "errors": sum(r["error"] is not None for r in flat), "complete": complete, "requests": len(flat),
            "texts": [r["text"] for r in flat], "first_error": next((r["error"] for r in flat if r["error"]), None)}


def run_direct(mdir: Path, plan: list[list[dict]], queue: str, rows: int, dtype: str, threads: int) -> dict:
    """The same requests and queue driven through an Engine in this process, no HTTP: each client's
    next request is submitted from the engine's callback when its last one ends. Separates the
    engine's batching from the server's per-token work (they share one interpreter in `mellum2 serve`)."""
    from mellum2 import load_pretrained
    from mellum2.infer import Engine, SamplingParams

    torch.set_num_threads(threads)
    model = load_pretrained(mdir, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    bodies = [b for rs in plan for b in rs]
    if queue == "shared":
        lists = [iter(range(len(bodies)))] * len(plan)
    else:
        ends = [sum(map(len, plan[:c + 1])) for c in range(len(plan))]
        lists = [iter(range(e - len(plan[c]), e)) for c, e in enumerate(ends)]
    eng = Engine(model, max_num_seqs=rows, max_model_len=model.cfg.max_position_embeddings,
                 prefix_cache_tokens=4 * model.cfg.max_position_embeddings, prefill_chunk=256)
    tokens: dict[int, list[int]] = {}

    def next_of(c: int) -> None:
        i = next(lists[c], None)
        if i is None:
            return
        b = bodies[i]
        tokens[i] = []

        def on(d, i=i, c=c):
            tokens[i].extend(d.token_ids)
            if d.finished:
                next_of(c)
        eng.submit(b["prompt"], SamplingParams(max_new_tokens=b["max_tokens"], temperature=0, ignore_eos=True),
                   callback=on)

    t0 = time.perf_counter()
    for c in range(len(plan)):  # every client's first request; beyond `rows` they wait in the engine's queue
        next_of(c)
    while eng.has_work():
        eng.step()
    wall = time.perf_counter() - t0
    n = sum(map(len, tokens.values()))
    return {"wall_s": wall, "tokens": n, "tok_s": n / wall, "ids": [tokens.get(i) for i in range(len(bodies))]}


async def run_file(url: str, args, vocab: int, bos: int) -> dict:
    """The growing file: each request is the whole file so far; TTFT of each (the first excluded:
    it fills the cache)."""
    rng = random.Random(args.seed + 1)
    file = [bos] + [rng.randrange(33, vocab) for _ in range(args.file_tokens - 1)]
    ttfts, texts = [], []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        for i in range(args.file_requests):
            r = await stream_one(client, url, {"model": "bench", "prompt": file, "max_tokens": args.file_output,
                                               "temperature": 0, "ignore_eos": True})
            if r["error"]:
                raise RuntimeError(f"growing-file request {i}: {r['error']}")
            ttfts.append(r["ttft"])
            texts.append(r["text"])
            file = file + [rng.randrange(33, vocab) for _ in range(args.file_growth)]
    return {"ttft_p50": statistics.median(ttfts[1:]), "ttft_mean": statistics.mean(ttfts[1:]),
            "first_ttft": ttfts[0], "texts": texts}


def fmt(x, scale=1000.0, unit="ms"):
    return "-" if x is None else f"{x * scale:.1f} {unit}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default=None, help="checkpoint or run directory (default: random weights of --config)")
    a("--config", default="tiny", help="preset name or config.json for random weights (without --model)")
    a("--context", type=int, default=1024, help="max_position_embeddings of the random model")
    a("--clients", type=int, default=32)
    a("--requests", type=int, default=3, help="requests per client (the workload has clients x requests)")
    a("--queue", default="shared", choices=("shared", "per-client"),
      help="shared: each client takes the next request of one queue when its last one ends (the clients "
           "stay busy until it runs dry); per-client: each client streams its own requests")
    a("--prompt-lens", default="16,32,64,128,256", help="prompt lengths (tokens) to draw from")
    a("--output-lens", default="32,64,128,256", help="completion lengths (tokens) to draw from")
    a("--file-tokens", type=int, default=800, help="growing-file workload: the file's length at the start")
    a("--file-growth", type=int, default=4, help="tokens the file grows by between requests")
    a("--file-requests", type=int, default=12)
    a("--file-output", type=int, default=8, help="completion tokens per growing-file request")
    a("--speculative", action="store_true", help="serve with MTP speculation")
    a("--threads", type=int, default=1, help="torch threads of the server")
    a("--dtype", default="fp32", choices=("bf16", "fp32"),
      help="the servers' --dtype (fp32: the server's default; in bf16 batched and lone matmuls round differently, "
           "so greedy near-ties of random weights flip)")
    a("--skip", default="", help="comma-separated parts to skip: static, serial, file")
    a("--direct", action="store_true",
      help="also drive the engine in this process with the same requests and queue (no HTTP), continuous "
           "and one at a time, for the ratio without the server's per-token work")
    a("--seed", type=int, default=0)
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            mdir = resolve_model_dir(args.model, flag="--model")
            tok = Tokenizer.load(tokenizer_dir(mdir))
            cfg = json.loads((mdir / "config.json").read_text())
            vocab, context = min(tok.vocab_size, cfg["vocab_size"]), cfg["max_position_embeddings"]
        else:
            mdir = random_checkpoint(args.config, Path(tmp) / "model", args.context)
            tok = Tokenizer.load(mdir)
            vocab, context = tok.vocab_size, args.context
        plan = workload(args, vocab, tok.bos_id)
        base = (["--max-waiting", str(args.clients * args.requests), "--dtype", args.dtype]
                + (["--speculative"] if args.speculative else []))
        n = str(args.clients)
        ways = {"continuous": ["--max-num-seqs", n], "static": ["--max-num-seqs", n, "--batching", "static"],
                "serial": ["--max-num-seqs", "1"]}
        res = {}
        for name, flags in ways.items():
            if name in skip:
                continue
            with Server(mdir, base + flags, args.threads) as srv:
                c0 = srv.cpu_s()
                p0 = time.process_time()
                res[name] = asyncio.run(run_load(srv.url, plan, args.queue))
                res[name]["client_cpu_s"] = time.process_time() - p0
                res[name]["server_cpu_s"] = srv.cpu_s() - c0

            r = res[name]
            r["tok_per_cpu_s"] = r["tokens"] / r["server_cpu_s"]
            print(f"{name:<11} {r['tok_s']:8.1f} tok/s ({r['tok_per_cpu_s']:.1f} per server CPU-s)  TTFT p50 {fmt(r['ttft_p50'])} p99 {fmt(r['ttft_p99'])}  "
                  f"ITL p50 {fmt(r['itl_p50'])} p99 {fmt(r['itl_p99'])}  errors {r['errors']}  complete "
                  f"{r['complete']}/{r['requests']}  ({r['wall_s']:.1f} s; load generator {r['client_cpu_s']:.1f} CPU-s)" +
                  (f"  first error: {r['first_error']}" if r["first_error"] else ""), flush=True)
        ref = res.get("serial")
        summary = {"model": str(args.model or f"random {args.config}"), "clients": args.clients,
                   "requests": args.clients * args.requests, "speculative": args.speculative, "threads": args.threads,
                   "dtype": args.dtype, "queue": args.queue}
        for name, r in res.items():
            summary[name] = {k: v for k, v in r.items() if k not in ("texts",)}
            if ref is not None:
                summary[name]["equal_to_alone"] = sum(a == b for a, b in zip(r["texts"], ref["texts"]))
        if ref is not None and "continuous" in res:
            summary["continuous_over_serial"] = res["continuous"]["tok_s"] / ref["tok_s"]
            summary["continuous_over_serial_cpu"] = res["continuous"]["tok_per_cpu_s"] / ref["tok_per_cpu_s"]
            print(f"continuous / serial throughput: {summary['continuous_over_serial']:.2f}x wall, "
                  f"{summary['continuous_over_serial_cpu']:.2f}x per server CPU-s; streams equal to "
                  f"the request served alone: {summary['continuous']['equal_to_alone']}/{len(ref['texts'])}")
        if "static" in res and "continuous" in res:
            summary["continuous_over_static"] = res["continuous"]["tok_s"] / res["static"]["tok_s"]
            summary["continuous_over_static_cpu"] = res["continuous"]["tok_per_cpu_s"] / res["static"]["tok_per_cpu_s"]
            print(f"continuous / static throughput: {summary['continuous_over_static']:.2f}x wall, "
                  f"{summary['continuous_over_static_cpu']:.2f}x per server CPU-s")

        if args.direct:
            d = {name: run_direct(mdir, plan, args.queue, rows, args.dtype, args.threads)
                 for name, rows in (("continuous", args.clients), ("serial", 1))}
            same = sum(a == b for a, b in zip(d["continuous"]["ids"], d["serial"]["ids"]))
            ratio = d["continuous"]["tok_s"] / d["serial"]["tok_s"]
            print(f"direct (engine in this process, no HTTP): continuous {d['continuous']['tok_s']:.1f} tok/s, "
                  f"one at a time {d['serial']['tok_s']:.1f} tok/s: {ratio:.2f}x; equal {same}/{len(d['serial']['ids'])}",
                  flush=True)
            summary["direct"] = {"continuous_tok_s": d["continuous"]["tok_s"], "serial_tok_s": d["serial"]["tok_s"],
                                 "ratio": ratio, "equal": same}

        if "file" not in skip:
            if args.file_tokens + args.file_growth * args.file_requests + args.file_output > context:
                raise SystemExit(f"the growing file does not fit the context of {context}: lower --file-tokens")
            f = {}
            for name, flags in (("cache", []), ("no_cache", ["--prefix-cache-tokens", "0"])):
                with Server(mdir, base + ["--max-num-seqs", "4"] + flags, args.threads) as srv:
                    f[name] = asyncio.run(run_file(srv.url, args, vocab, tok.bos_id))
            ratio = f["no_cache"]["ttft_p50"] / f["cache"]["ttft_p50"]
            same = f["cache"]["texts"] == f["no_cache"]["texts"]
            print(f"growing file ({args.file_tokens}+ tokens): TTFT p50 {fmt(f['cache']['ttft_p50'])} with the prefix "
                  f"cache, {fmt(f['no_cache']['ttft_p50'])} without: {ratio:.2f}x; completions equal: {same}")
            summary["file"] = {"ttft_p50_cache": f["cache"]["ttft_p50"], "ttft_p50_no_cache": f["no_cache"]["ttft_p50"],
                               "ttft_ratio": ratio, "equal": same, "file_tokens": args.file_tokens,
                               "requests": args.file_requests}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
