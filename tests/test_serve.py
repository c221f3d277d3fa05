"""`run.py serve`: LibreTranslate's API, batching of concurrent requests, limits and errors as 4xx."""
import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from seq2seq.checkpoint import TextInfo
from seq2seq.search import SearchConfig
from seq2seq.serve import BadRequest, Batcher, ServeLimits, create_app
from tests.conftest import ROOT, free_port


class Echo:
    """A stand-in translator: 'translates' by upper-casing after the prefix, n-best by numbering; records
    each batch and its prefixes."""

    info = TextInfo("en", "ja", normalize=False, bleu_tokenize="ja-mecab", data_config={})

    def __init__(self):
        self.batches, self.prefixes = [], []

    def translate_nbest(self, lines, search, prefixes=None, scores=True):
        self.batches.append(list(lines))
        self.prefixes.append(prefixes)
        starts = prefixes or [""] * len(lines)
        return [[(f"{p}{line.upper()}#{k}" if k else f"{p}{line.upper()}", -float(k)) for k in range(search.nbest)]
                for line, p in zip(lines, starts)]


def client(translator=None, **limits):
    translator = translator or Echo()
    app = create_app(translator, SearchConfig(beam_size=5), ServeLimits(**{"batch_ms": 1.0, **limits}))
    return TestClient(app), translator


def test_a_string_in_gives_a_string_out_and_a_list_a_list():
    with client()[0] as http:
        answer = http.post("/translate", json={"q": "hello", "source": "en", "target": "ja"})
        assert answer.status_code == 200 and answer.json() == {"translatedText": "HELLO"}
        answer = http.post("/translate", json={"q": ["a", "", "b"], "source": "en", "target": "ja"})
        assert answer.json() == {"translatedText": ["A", "", "B"]}
        answer = http.post("/translate", json={"q": "hi", "source": "en", "target": "ja", "alternatives": 2})
        assert answer.json() == {"translatedText": "HI", "alternatives": ["HI#1", "HI#2"]}


def test_languages_health_and_openapi_docs():
    with client()[0] as http:
        assert http.get("/languages").json() == [{"code": "en", "name": "English", "targets": ["ja"]}]
        assert http.get("/health").json() == {"status": "ok"}
        assert "/translate" in http.get("/openapi.json").json()["paths"]


def ask_together(http, requests: dict) -> dict:
    """POSTs each of `requests` (name: body without source and target) to /translate at once, each from its own
    thread; their answers by name."""
    answers = {}

    def ask(name, body):
        answers[name] = http.post("/translate", json={"source": "en", "target": "ja", **body}).json()

    threads = [threading.Thread(target=ask, args=item) for item in requests.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_concurrent_requests_are_translated_in_one_batch_and_each_gets_its_own_answer():
    http, translator = client(batch_ms=300.0, batch_max_ms=3000.0)
    with http:
        answers = ask_together(http, {t: {"q": [t, t + "!"]} for t in ("one", "two", "three")})
    assert {t: a["translatedText"] for t, a in answers.items()} == {
        "one": ["ONE", "ONE!"], "two": ["TWO", "TWO!"], "three": ["THREE", "THREE!"]}
    assert len(translator.batches) == 1 and sorted(translator.batches[0]) == sorted(
        ["one", "one!", "two", "two!", "three", "three!"])


def run_batcher(limits: ServeLimits, clients, translator=None):
    """Runs a Batcher over `translator` (an Echo) while `clients(batcher)` sends its requests; its batches' lines."""
    translator = translator or Echo()

    async def serve():
        batcher = Batcher(translator.translate_nbest, SearchConfig(beam_size=1), limits, ThreadPoolExecutor(1))
        runner = asyncio.create_task(batcher.run())
        try:
            await clients(batcher)
        finally:
            runner.cancel()
        return translator.batches

    return asyncio.run(serve())


@pytest.mark.parametrize("batch_max_ms, expected", [(2000.0, [6]), (120.0, [3, 3])])
def test_a_burst_of_requests_is_one_batch_until_it_stops_or_the_batch_is_old(batch_max_ms, expected):
    """Requests every 50 ms with batch_ms=150: each comes within the quiet gap of the last, so one batch takes
    them all (a fixed 150 ms window from the first would have cut it), unless batch_max_ms cuts it first. After
    a batch of three, the next waits for a burst as the first did."""
    answers = []

    async def burst(batcher):
        asks = []
        for i in range(6):
            asks.append(asyncio.create_task(batcher.translate([f"s{i}"], None, 1)))
            await asyncio.sleep(0.05)
        answers.extend(await asyncio.gather(*asks))

    batches = run_batcher(ServeLimits(batch_ms=150.0, batch_max_ms=batch_max_ms), burst)
    assert [a[0][0][0] for a in answers] == [f"S{i}" for i in range(6)]
    assert [len(b) for b in batches] == expected


def test_a_lone_client_one_request_at_a_time_does_not_wait_for_others():
    """After a batch of one request the next starts at once, not after batch_ms (10 s here, so waiting for it
    would time out). The first batch starts at once too, being full (batch_lines)."""
    async def one_at_a_time(batcher):
        await asyncio.wait_for(batcher.translate(["a", "b"], None, 1), 5)
        for line in ("c", "d", "e"):
            await asyncio.wait_for(batcher.translate([line], None, 1), 5)

    limits = ServeLimits(batch_ms=10_000.0, batch_max_ms=10_000.0, batch_lines=2)
    assert run_batcher(limits, one_at_a_time) == [["a", "b"], ["c"], ["d"], ["e"]]


class SlowEcho(Echo):
    def translate_nbest(self, lines, search, prefixes=None, scores=True):
        time.sleep(0.2)
        return super().translate_nbest(lines, search, prefixes, scores)


def test_after_a_batch_of_one_with_requests_queued_behind_it_the_next_batch_waits_as_usual():
    """A request comes while a one-request batch is translated (200 ms): that is load, not a lone client, so the
    next batch waits batch_ms for the one after it (100 ms later), as it would after any batch."""

    async def load(batcher):
        first = asyncio.create_task(batcher.translate(["a", "b"], None, 1))  # full (batch_lines): starts at once
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(batcher.translate(["c"], None, 1))  # comes while "a b" is translated
        await first
        await asyncio.sleep(0.1)
        await asyncio.gather(queued, batcher.translate(["d"], None, 1))

    limits = ServeLimits(batch_ms=1000.0, batch_max_ms=3000.0, batch_lines=2)
    assert run_batcher(limits, load, SlowEcho()) == [["a", "b"], ["c", "d"]]


@pytest.mark.parametrize("given_up", ["while translated", "while waiting"])
def test_a_request_given_up_leaves_the_service_answering_the_others(given_up):
    """A request whose waiting task is cancelled (its handler given up) must not stop the batcher: before, setting
    the result of its cancelled future raised, the batcher's task ended, and every later request hung. One given up
    while it still waits for its batch is not translated at all."""

    async def clients(batcher):
        gone = asyncio.create_task(batcher.translate(["a"], None, 1))
        await asyncio.sleep(0.05)  # "a" is being translated (200 ms), or waits for others (batch_ms 1 s)
        gone.cancel()
        later = await asyncio.wait_for(batcher.translate(["b"], None, 1), 5)
        assert later == [[("B", 0.0)]]

    translating = given_up == "while translated"
    limits = ServeLimits(batch_ms=1.0 if translating else 1000.0, batch_max_ms=3000.0)
    batches = run_batcher(limits, clients, SlowEcho())
    assert batches == ([["a"], ["b"]] if translating else [["b"]])


class BeamEcho(Echo):
    """An Echo that records the beam of each search too."""

    def __init__(self):
        super().__init__()
        self.beams = []

    def translate_nbest(self, lines, search, prefixes=None, scores=True):
        self.beams.append(search.beam_size)
        return super().translate_nbest(lines, search, prefixes, scores)


def test_a_request_for_more_alternatives_than_the_beam_does_not_widen_the_others_beam():
    """The service's beam is 5; a request for 7 alternatives needs 8. Batched together, the plain requests are still
    searched with 5 beams (a wider beam can find another best translation), the other with 8, in its own search."""
    translator = BeamEcho()
    http = TestClient(create_app(translator, SearchConfig(beam_size=5), ServeLimits(batch_ms=300.0)))
    requests = {"plain": {"q": ["a", "b"]}, "wide": {"q": "c", "alternatives": 7}, "one": {"q": "d", "alternatives": 1}}
    with http:
        answers = ask_together(http, requests)
    assert answers["plain"] == {"translatedText": ["A", "B"]}
    assert answers["wide"] == {"translatedText": "C", "alternatives": [f"C#{k}" for k in range(1, 8)]}
    assert answers["one"] == {"translatedText": "D", "alternatives": ["D#1"]}
    assert sorted(zip(translator.beams, map(sorted, translator.batches))) == [(5, ["a", "b", "d"]), (8, ["c"])]


def test_a_request_beyond_queue_lines_is_a_503_at_once_and_the_service_goes_on():
    """queue_lines=3: while a request of two lines is translated (200 ms), another of two is turned away at once;
    one of one line still fits, and once the first is answered, two lines fit again."""

    async def flood(batcher):
        first = asyncio.create_task(batcher.translate(["a", "b"], None, 1))
        await asyncio.sleep(0.05)
        with pytest.raises(BadRequest, match=r"busy: 2 lines wait to be translated \(queue_lines=3\); retry later"):
            await asyncio.wait_for(batcher.translate(["c", "d"], None, 1), 1)
        await asyncio.wait_for(asyncio.gather(first, batcher.translate(["e"], None, 1)), 5)
        assert batcher.waiting == 0
        await asyncio.wait_for(batcher.translate(["f", "g"], None, 1), 5)

    limits = ServeLimits(batch_ms=1.0, batch_lines=2, queue_lines=3)
    assert run_batcher(limits, flood, SlowEcho()) == [["a", "b"], ["e"], ["f", "g"]]


def test_a_prefix_per_text_and_requests_with_and_without_one_share_a_batch():
    http, translator = client(batch_ms=300.0, batch_max_ms=3000.0)
    requests = {"plain": {"q": ["a", "b"]}, "one": {"q": "c", "prefix": "私は"},
                "list": {"q": ["d", "e"], "prefix": ["", "x "]}}
    with http:
        answers = ask_together(http, requests)
        http.post("/translate", json={"q": "f", "source": "en", "target": "ja"})
    assert answers == {"plain": {"translatedText": ["A", "B"]}, "one": {"translatedText": "私はC"},
                       "list": {"translatedText": ["D", "x E"]}}
    assert len(translator.batches) == 2
    given = dict(zip(translator.batches[0], translator.prefixes[0]))
    assert given == {"a": "", "b": "", "c": "私は", "d": "", "e": "x "}
    assert translator.prefixes[1] is None  # no prefix anywhere in a batch: the search gets none at all


def test_a_sampling_service_takes_a_prefix_too():
    """Greedy search and sampling continue a forced prefix as beam search does: no 400 for the pair."""
    translator = Echo()
    app = create_app(translator, SearchConfig(beam_size=1, sample=True), ServeLimits(batch_ms=1.0))
    with TestClient(app) as http:
        answer = http.post("/translate", json={"q": "c", "source": "en", "target": "ja", "prefix": "私は"})
    assert answer.status_code == 200 and answer.json() == {"translatedText": "私はC"}
    assert translator.prefixes == [["私は"]]


def test_a_sampling_service_refuses_alternatives_and_goes_on_serving():
    """Sampling draws one translation per text: a request for alternatives is a 400 naming the field. Before, it
    reached the batcher, whose search settings refused nbest > 1 there: the batcher's task ended, and this request
    and every later one hung."""
    app = create_app(Echo(), SearchConfig(beam_size=1, sample=True), ServeLimits(batch_ms=1.0))
    with TestClient(app) as http:
        answer = http.post("/translate", json={"q": "c", "source": "en", "target": "ja", "alternatives": 1})
        assert answer.status_code == 400 and answer.json()["error"] == (
            "alternatives=1: this service samples one translation per text (sample=true); alternatives need beam "
            "search")
        answer = http.post("/translate", json={"q": "d", "source": "en", "target": "ja"})
        assert answer.status_code == 200 and answer.json() == {"translatedText": "D"}


def test_search_settings_the_batch_cannot_have_are_a_503_and_the_batcher_goes_on():
    """Whatever building a batch's search raises is that batch's 503, never the batcher's end (which would leave
    every later request waiting)."""

    async def clients(batcher):
        batcher.search = SearchConfig(beam_size=1, sample=True)  # nbest 2 is then refused where the search is built
        with pytest.raises(BadRequest, match="translation failed: sample=true draws one translation per line"):
            await asyncio.wait_for(batcher.translate(["a"], None, 2), 5)
        batcher.search = SearchConfig(beam_size=2)
        assert await asyncio.wait_for(batcher.translate(["b"], None, 2), 5) == [[("B", 0.0), ("B#1", -1.0)]]

    assert run_batcher(ServeLimits(batch_ms=1.0), clients) == [["b"]]


@pytest.mark.parametrize("body, status, error", [
    ({"q": "hi", "source": "fr", "target": "ja"}, 400, "source='fr', target='ja': this model translates en to ja"),
    ({"q": "hi", "source": "en"}, 400, "target: Field required"),
    ({"q": 3, "source": "en", "target": "ja"}, 400, "q"),
    ({"q": "x" * 51, "source": "en", "target": "ja"}, 400, "q[0]: 51 characters exceed the limit of 50"),
    ({"q": ["a"] * 4, "source": "en", "target": "ja"}, 400, "q: 4 texts exceed the limit of 3 per request"),
    ({"q": "hi", "source": "en", "target": "ja", "alternatives": -1}, 400, "alternatives"),
    ({"q": "hi", "source": "en", "target": "ja", "format": "html"}, 400, "format='html': only text"),
    ({"q": ["a", "b"], "source": "en", "target": "ja", "prefix": ["x"]}, 400,
     "prefix: give one per text, shaped like q (a list of 2)"),
    ({"q": "a", "source": "en", "target": "ja", "prefix": ["x"]}, 400,
     "prefix: give one per text, shaped like q (a text)"),
    ({"q": "a", "source": "en", "target": "ja", "prefix": "x" * 51}, 400, "prefix[0]: 51 characters exceed"),
    ({"q": "a", "source": "en", "target": "ja", "prefix": 7}, 400, "prefix"),
])
def test_bad_requests_are_4xx_with_a_json_error_naming_the_field(body, status, error):
    with client(char_limit=50, texts_limit=3)[0] as http:
        answer = http.post("/translate", json=body)
    assert answer.status_code == status and error in answer.json()["error"]


def test_a_lone_surrogate_escaped_in_json_is_a_400_not_a_failed_search():
    with client()[0] as http:
        for body, error in ((b'{"q": ["ok", "\\ud800"], "source": "en", "target": "ja"}',
                             "q[1]: not valid Unicode (a lone surrogate at character 0)"),
                            (b'{"q": "a", "source": "en", "target": "ja", "prefix": "x\\udfff"}',
                             "prefix[0]: not valid Unicode (a lone surrogate at character 1)")):
            answer = http.post("/translate", content=body, headers={"content-type": "application/json"})
            assert answer.status_code == 400 and answer.json()["error"] == error


def test_malformed_json_and_a_large_body_are_4xx():
    with client(body_limit=100)[0] as http:
        answer = http.post("/translate", content=b'{"q": "hi", ', headers={"content-type": "application/json"})
        assert answer.status_code == 400 and "error" in answer.json()
        answer = http.post("/translate", content=json.dumps({"q": "x" * 200, "source": "en", "target": "ja"}),
                           headers={"content-type": "application/json"})
        assert answer.status_code == 413 and "100 bytes" in answer.json()["error"]


def test_a_failing_model_is_a_503_not_a_crash():
    class Broken(Echo):
        def translate_nbest(self, lines, search, prefixes=None, scores=True):
            raise RuntimeError("out of memory")

    with client(Broken())[0] as http:
        answer = http.post("/translate", json={"q": "hi", "source": "en", "target": "ja"})
        assert answer.status_code == 503 and "out of memory" in answer.json()["error"]
        assert answer.headers["retry-after"] == "1"
        assert http.get("/health").status_code == 200  # still serving


@pytest.mark.slow
def test_the_same_answer_as_translate(smoke_run):
    from seq2seq.translator import Translator

    translator = Translator.from_checkpoint(smoke_run / "checkpoints" / "best.ckpt", device="cpu")
    lines = ["The big dog ate the red apple.", "Does the cat read the book?", ""]
    search = SearchConfig(beam_size=3, precision="32")
    with TestClient(create_app(translator, search, ServeLimits())) as http:
        answer = http.post("/translate", json={"q": lines, "source": "en", "target": "ja"}).json()
        forced = http.post("/translate", json={"q": lines, "source": "en", "target": "ja",
                                               "prefix": ["猫", "", ""]}).json()
    assert answer["translatedText"] == translator.translate(lines, search)
    nbest = translator.translate_nbest(lines, search, prefixes=["猫", "", ""])
    assert forced["translatedText"] == [hyps[0][0] for hyps in nbest]
    assert forced["translatedText"][0].startswith("猫") and forced["translatedText"][1:] == answer["translatedText"][1:]


@pytest.mark.slow
def test_sigterm_answers_what_was_accepted_then_exits(smoke_run):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "run.py", "serve", f"ckpt={smoke_run}/checkpoints/best.ckpt",
                             f"port={port}", "batch_ms=1500", "batch_max_ms=1500"], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # the event: the service answers /health
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        answer = {}

        def ask():
            request = urllib.request.Request(f"http://127.0.0.1:{port}/translate", method="POST",
                                             data=json.dumps({"q": "The cat eats the fish.", "source": "en",
                                                              "target": "ja"}).encode(),
                                             headers={"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                answer.update(status=response.status, body=json.load(response))

        thread = threading.Thread(target=ask)
        thread.start()
        time.sleep(0.5)  # the request is inside its 1.5 s batching window
        proc.send_signal(signal.SIGTERM)
        thread.join(60)
        assert answer["status"] == 200 and answer["body"]["translatedText"]  # answered, though SIGTERM came first
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
    finally:
        proc.kill()
