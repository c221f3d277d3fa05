"""`run.py serve` under load and under attack, against the same translations done offline.

  1. Load: `--clients` concurrent clients send `--requests` single-sentence requests (the test split's
     sentences, round and round) to a service started by this script; counts the answers unlike the
     offline translation. Prints p50/p99 latency and sentences/s, against one batch job translating
     the same sentences with Translator.translate (the model already loaded, as in the service).
  2. A lone request: the median latency of one-sentence requests sent one at a time, against a direct
     Translator.translate call on the same sentence.
  3. Hostile requests (`--hostile`): malformed JSON, huge bodies, wrong types, empty and oversized
     texts, control characters, invalid UTF-8 bytes. None may get a 5xx or a dropped connection, and
     the service must still answer correctly afterwards.

Both sides decode at `--precision` (default: auto, the machine's choice). An answer should not depend on
which requests share its batch: at fp32 none has differed; int8 scales each row on its own, and only
rare near-ties differ (attention over another batch's padding changes fp32 sums in their last bit).
`--batch-max-ms 5 50` loads two services side by side: 5 is the fixed 5 ms window of `batch_ms` alone
(the batcher before a batch could follow a burst), 50 the default. Bounded: every request has a timeout,
and the service is stopped at the end.

    python bench/serve_load.py --ckpt runs/x/checkpoints/best.ckpt --data-url PATH/small_parallel_enja \
        [--batch-max-ms 5 50]
"""
import argparse
import http.client
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: bytes, timeout: float = 120) -> tuple[int, bytes]:
    """One POST /translate on its own connection: (status, body); status 0 if the connection failed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/translate", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        conn.close()


def ask(port: int, text: str, langs: tuple[str, str]) -> tuple[float, int, str | None]:
    start = time.perf_counter()
    status, body = post(port, json.dumps({"q": text, "source": langs[0], "target": langs[1]}).encode())
    answer = json.loads(body).get("translatedText") if status == 200 else None
    return time.perf_counter() - start, status, answer


def hostile_bodies(n: int, langs: tuple[str, str]) -> list[bytes]:
    """n request bodies a service must refuse (or answer) without a 5xx."""
    rng = random.Random(0)
    src, tgt = langs
    makers = [
        lambda: b'{"q": "hi", ',  # truncated JSON
        lambda: b"not json at all",
        lambda: b"\xff\xfe\x00garbage",  # invalid UTF-8
        lambda: json.dumps({"q": "x" * 2_000_000, "source": src, "target": tgt}).encode(),  # over body_limit
        lambda: json.dumps({"q": "x" * 6000, "source": src, "target": tgt}).encode(),  # over char_limit
        lambda: json.dumps({"q": ["a"] * 500, "source": src, "target": tgt}).encode(),  # over texts_limit
        lambda: json.dumps({"q": rng.choice([3, None, {"a": 1}, [1, 2], True]), "source": src, "target": tgt}).encode(),
        lambda: json.dumps({"q": "", "source": src, "target": tgt}).encode(),
        lambda: json.dumps({"q": "".join(chr(rng.randrange(0, 32)) for _ in range(50)), "source": src,
                            "target": tgt}).encode(),  # control characters
        lambda: json.dumps({"q": "hello", "source": "fr", "target": tgt}).encode(),
        lambda: json.dumps({"q": "hello", "source": src, "target": tgt, "alternatives": -3}).encode(),
        lambda: json.dumps({"q": "hello", "source": src, "target": tgt, "alternatives": 10 ** 9}).encode(),
        lambda: json.dumps({"q": "hello", "source": src, "target": tgt, "prefix": ["a", "b"]}).encode(),
        lambda: json.dumps([1, 2, 3]).encode(),
        # a lone surrogate
        lambda: b'{"q": "\\ud800", "source": "' + src.encode() + b'", "target": "' + tgt.encode() + b'"}',
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))),  # random bytes
    ]
    return [makers[i % len(makers)]() for i in range(n)]


def start_service(args, port: int, batch_max_ms: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "run.py", "serve", f"ckpt={args.ckpt}", f"port={port}",
                             f"beam_size={args.beam_size}", f"precision={args.precision}",
                             f"batch_max_ms={batch_max_ms}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the service did not come up within 120 s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data-url", required=True, help="small_parallel_enja's directory (its test split)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--hostile", type=int, default=1000)
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--precision", default="auto", help="both sides: auto, 32, bf16 or int8")
    parser.add_argument("--batch-max-ms", type=float, nargs="+", default=[50.0],
                        help="services to load side by side (5: the fixed 5 ms window of batch_ms alone); the lone "
                             "and hostile requests go to the last")
    args = parser.parse_args()

    from seq2seq.hardware import choose_precision, machine_report, this_machine
    from seq2seq.search import SearchConfig
    from seq2seq.textprep import natural_form
    from seq2seq.translator import Translator

    print(machine_report(this_machine()), flush=True)
    translator = Translator.from_checkpoint(args.ckpt, device="cpu")
    info = translator.info
    langs = (info.src_lang, info.tgt_lang)
    test = Path(args.data_url, f"test.{info.src_lang}").read_text(encoding="utf-8").splitlines()
    test = [natural_form(line, info.src_lang) for line in test]  # as users type them
    sentences = [test[i % len(test)] for i in range(args.requests)]
    search = SearchConfig(beam_size=args.beam_size, precision=args.precision)
    translator.translate(test[:16], search)  # warm-up
    start = time.perf_counter()
    expected = dict(zip(test, translator.translate(sentences, search)[:len(test)]))
    batch_s = time.perf_counter() - start
    lone = test[:20]
    direct = []
    for line in lone:
        t = time.perf_counter()
        translator.translate(line, search)
        direct.append(time.perf_counter() - t)

    loads = []
    for batch_max_ms in args.batch_max_ms:
        port = free_port()
        service = start_service(args, port, batch_max_ms)
        try:
            for line in test[:8]:
                ask(port, line, langs)  # warm-up
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                results = list(pool.map(lambda line: ask(port, line, langs), sentences))
            loads.append((batch_max_ms, results, time.perf_counter() - start))
            if batch_max_ms == args.batch_max_ms[-1]:
                served = [ask(port, line, langs)[0] for line in lone]
                statuses = [post(port, body, timeout=60)[0] for body in hostile_bodies(args.hostile, langs)]
                after = [ask(port, line, langs) for line in test[:20]]
        finally:
            service.terminate()
            service.wait(timeout=60)

    precision = choose_precision(args.precision, "cpu", training=False, machine=this_machine(),
                                 d_model=translator.model.cfg.d_model)[0]
    print(f"\nservice: beam {args.beam_size}, precision {args.precision} ({precision}); "
          f"{args.requests} one-sentence requests from {args.clients} clients; "
          f"one batch job: {args.requests / batch_s:.1f} sentences/s")
    print("| batch_max_ms | errors | unlike offline | p50 ms | p99 ms | sentences/s | of the batch job |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch_max_ms, results, load_s in loads:
        latencies = sorted(r[0] for r in results)
        wrong = sum(r[2] != expected[line] for r, line in zip(results, sentences))
        errors = sum(r[1] != 200 for r in results)
        print(f"| {batch_max_ms:g} | {errors} | {wrong} | {statistics.median(latencies) * 1000:.0f} | "
              f"{latencies[int(0.99 * len(latencies))] * 1000:.0f} | {args.requests / load_s:.1f} | "
              f"{batch_s / load_s:.2f} |")
    print(f"a lone request: median {statistics.median(served) * 1000:.0f} ms over HTTP, "
          f"{statistics.median(direct) * 1000:.0f} ms as a direct Translator call: "
          f"{statistics.median(served) / statistics.median(direct):.2f}x")
    counts = {status: statuses.count(status) for status in sorted(set(statuses))}
    print(f"hostile: {len(statuses)} requests, statuses {counts}; "
          f"5xx {sum(s >= 500 for s in statuses)}, dropped connections {statuses.count(0)}")
    print(f"afterwards: {sum(a[1] == 200 and a[2] == expected[line] for a, line in zip(after, test))} of 20 answered "
          "as offline")


if __name__ == "__main__":
    main()
