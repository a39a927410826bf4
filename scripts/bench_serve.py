"""Load generator for `furnace serve` (or any OpenAI-compatible server), measuring what vLLM's
`bench serve` measures: time to first token (TTFT), time per output token after the first
(TPOT), inter-token latency (ITL), request and output-token throughput.

    python scripts/bench_serve.py --url http://127.0.0.1:8000 --concurrency 8 --requests 32 \
        [--rate 2.0] [--min-prompt 32] [--max-prompt 512] [--output 128] [--seed 0] [--shared-prefix 256]

Requests stream (`/v1/completions`, `ignore_eos`, temperature 0) prompts of random token ids,
lengths uniform in [min, max]; with `--rate`, arrivals are Poisson at that many per second
(at most `--concurrency` in flight), otherwise `--concurrency` clients send back to back;
`--shared-prefix N` starts every prompt with the same N tokens (a system prompt).
Prints one JSON line of results. Standard library only.
"""

import argparse
import http.client
import json
import random
import statistics
import threading
import time
import urllib.parse


def one_request(url: urllib.parse.ParseResult, prompt: list, output: int) -> dict:
    body = json.dumps({"prompt": prompt, "max_tokens": output, "temperature": 0, "ignore_eos": True, "stream": True})
    start = time.perf_counter()
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=3600)
    connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"status {response.status}: {response.read()[:200]!r}")
    arrivals = []
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0].get("text"):
            arrivals.append(time.perf_counter())
    connection.close()
    end = time.perf_counter()
    return {"start": start, "end": end, "arrivals": arrivals, "output": output}


def percentile(values: list, p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second (0: back to back)")
    p.add_argument("--min-prompt", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8000, help="prompt token ids are drawn below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared-prefix", type=int, default=0, help="every prompt starts with the same this many tokens (a system prompt)")
    a = p.parse_args()
    url = urllib.parse.urlparse(a.url)
    rng = random.Random(a.seed)
    prefix = [rng.randrange(1, a.vocab) for _ in range(a.shared_prefix)]
    prompts = [prefix + [rng.randrange(1, a.vocab) for _ in range(rng.randint(a.min_prompt, a.max_prompt))] for _ in range(a.requests)]
    delays = [rng.expovariate(a.rate) if a.rate > 0 else 0.0 for _ in range(a.requests)]
    results, errors = [], []
    gate = threading.Semaphore(a.concurrency)
    lock = threading.Lock()

    def run(prompt: list) -> None:
        try:
            result = one_request(url, prompt, a.output)
            with lock:
                results.append(result)
        except Exception as e:  # a failed request is reported, not fatal
            with lock:
                errors.append(str(e))
        finally:
            gate.release()

    threads = []
    began = time.perf_counter()
    for prompt, delay in zip(prompts, delays):
        time.sleep(delay)
        gate.acquire()
        thread = threading.Thread(target=run, args=(prompt,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    ttft = [r["arrivals"][0] - r["start"] for r in results if r["arrivals"]]
    # Chunks can carry several tokens (text waits for a character's last byte): TPOT counts tokens.
    tpot = [(r["end"] - r["arrivals"][0]) / (r["output"] - 1) for r in results if r["arrivals"] and r["output"] > 1]
    itl = [b - a_ for r in results for a_, b in zip(r["arrivals"], r["arrivals"][1:])]
    out_tokens = sum(r["output"] for r in results)
    summary = lambda xs: {"mean_ms": 1e3 * statistics.mean(xs), "median_ms": 1e3 * statistics.median(xs), "p99_ms": 1e3 * percentile(xs, 99)} if xs else None
    print(json.dumps({
        "concurrency": a.concurrency, "rate": a.rate, "requests": len(results), "errors": len(errors), "seconds": elapsed,
        "request_throughput": len(results) / elapsed, "output_token_throughput": out_tokens / elapsed,
        "ttft": summary(ttft), "tpot": summary(tpot), "itl": summary(itl),
    }))


if __name__ == "__main__":
    main()
