"""`run.py serve`: an HTTP translation service with LibreTranslate's API, on FastAPI and uvicorn.

Why these: FastAPI validates requests into typed models and writes the OpenAPI docs (/docs) from them;
uvicorn is the ASGI server FastAPI is made for, and on SIGTERM it stops accepting connections and
finishes the requests it has before the process exits. Self-hosters already speak LibreTranslate's API:

    POST /translate  {"q": "..." | ["...", ...], "source": "en", "target": "ja", "alternatives": N}
                  -> {"translatedText": "..." | [...], "alternatives": [...]}   (alternatives only if N > 0)
    GET /languages, GET /health

One field of our own: "prefix", shaped like "q" (a text, or a list with one per text, "" for none),
forces the start of each translation, as `translate prefix=FILE` does.

Concurrent requests are batched: a batch keeps taking requests while they keep coming (until none has
come for `batch_ms`, `batch_max_ms` after its first, or `batch_lines` lines wait), then one beam search
translates all their lines and each request gets its own. After a batch of one request, with none come
while it was translated (a lone client), the next batch waits for nobody: it takes what is queued and starts.
A bad request is a 4xx with {"error": "..."}; never a 500.
"""
import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from seq2seq.search import SearchConfig

log = logging.getLogger(__name__)
LANGUAGE_NAMES = {"en": "English", "ja": "Japanese"}


@dataclass
class ServeLimits:
    """Request limits and the batching window. The one place their defaults live: `run.py` gives them to Hydra
    as the `serve_limits` config that conf/serve.yaml merges at its root (`run.py serve ... batch_ms=0`)."""

    char_limit: int = 5000  # characters per text
    texts_limit: int = 128  # texts per request
    body_limit: int = 1_000_000  # bytes per request body
    batch_ms: float = 5.0  # a batch starts when no request has come for this long (after a lone one: at once)
    batch_max_ms: float = 50.0  # ... or this long after its first request
    batch_lines: int = 256  # ... or at once when this many lines wait
    queue_lines: int = 8192  # lines taken and not yet answered beyond which a request gets a 503 (busy, Retry-After)

    def __post_init__(self):
        for name in ("char_limit", "texts_limit", "body_limit", "batch_lines", "queue_lines"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("batch_ms", "batch_max_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must not be negative")


class TranslateRequest(BaseModel):
    q: str | list[str]
    source: str
    target: str
    format: str = "text"
    alternatives: int = Field(0, ge=0)
    prefix: str | list[str] | None = None  # ours, not LibreTranslate's: each translation starts with it
    api_key: str | None = None  # accepted, as LibreTranslate clients send it; not checked


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def translation_thread() -> ThreadPoolExecutor:
    """The one thread that runs the model: load it there too (`serve`). Once two threads have run torch's
    parallel CPU kernels, each keeps an OpenMP thread team, and on a small machine decoding in the second
    measured 2.7x slower (a beam-5 sentence: 0.16 s against 0.059 s with the model loaded in the thread
    that decodes, 2-core Xeon)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="translate")


class Batcher:
    """Collects the lines of concurrent requests and translates them in one search, on one worker thread."""

    def __init__(self, translate_nbest, search: SearchConfig, limits: ServeLimits, worker: ThreadPoolExecutor):
        self.translate_nbest, self.search, self.limits = translate_nbest, search, limits
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker = worker
        self.lone = False  # the last batch had one request, and none came while it was translated
        self.waiting = 0  # lines taken and not yet answered

    async def translate(self, lines: list[str], prefixes: list[str] | None,
                        nbest: int) -> list[list[tuple[str, float]]]:
        """The nbest of each line, once its batch is translated; a 503 at once where queue_lines are taken already
        (a flood of requests is turned away while the service answers those it has, not queued without end)."""
        if self.waiting and self.waiting + len(lines) > self.limits.queue_lines:
            raise BadRequest(503, f"busy: {self.waiting} lines wait to be translated (queue_lines="
                                  f"{self.limits.queue_lines}); retry later")
        future = asyncio.get_running_loop().create_future()
        self.waiting += len(lines)
        try:
            await self.queue.put((lines, prefixes, nbest, future))
            return await future
        finally:
            self.waiting -= len(lines)

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            try:
                await self.gather_more(batch)
                batch = [request for request in batch if not request[3].cancelled()]  # given up while waiting
                if batch:
                    await self.translate_batch(batch)
            except Exception as e:  # noqa: BLE001  (whatever a batch raises is its 503s, never the batcher's end)
                log.exception("translation failed")  # a failing model, or a search the batch cannot have
                for _, _, _, future in batch:
                    if not future.done():  # done: answered, or given up (cancelled) while it was translated
                        future.set_exception(BadRequest(503, f"translation failed: {e}"))
            self.lone = len(batch) == 1 and self.queue.empty()

    async def gather_more(self, batch: list) -> None:
        """Requests that come in a burst (clients answered by the last batch send their next ones within
        milliseconds of each other, but not within one fixed window) go into one batch: a request waits
        batch_ms for others, a burst is taken whole up to batch_max_ms. After a batch of one request, with none
        come while it was translated, no burst is coming back: the batch takes what is queued and starts, so a
        lone client's requests, one at a time, do not each wait batch_ms for others that never come. (After a
        batch of one with others queued behind it, the batch waits as usual: starting those at once kept 32
        clients split into batches of 1 and 31, whose answers come back more than batch_ms apart.)"""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.batch_max_ms / 1000
        while sum(len(lines) for lines, _, _, _ in batch) < self.limits.batch_lines:
            if self.lone:  # a lone client's: take the queue, wait for no more
                if self.queue.empty():
                    return
                batch.append(self.queue.get_nowait())
                continue
            wait = min(self.limits.batch_ms / 1000, deadline - loop.time())
            if wait <= 0:
                return
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), wait))
            except asyncio.TimeoutError:
                return

    async def translate_batch(self, batch: list) -> None:
        """One search for each beam the batch's requests need. A request for N alternatives needs a beam of N + 1
        where the service's is narrower; the other requests keep the service's beam, so that no answer depends on
        the requests batched with it (a wider beam can find another best translation)."""
        beams: dict[int, list] = {}
        for request in batch:
            beams.setdefault(max(self.search.beam_size, request[2]), []).append(request)
        for beam_size, requests in sorted(beams.items()):
            await self.search_requests(requests, beam_size)

    async def search_requests(self, batch: list, beam_size: int) -> None:
        """Translates the lines of `batch`'s requests in one search of `beam_size` beams; answers each request."""
        lines = [line for request_lines, _, _, _ in batch for line in request_lines]
        prefixes = None  # no request forces a prefix: the search has nothing to force
        if any(request_prefixes for _, request_prefixes, _, _ in batch):
            prefixes = [p for request_lines, request_prefixes, _, _ in batch
                        for p in (request_prefixes or [""] * len(request_lines))]
        search = replace(self.search, nbest=max(n for _, _, n, _ in batch), beam_size=beam_size)
        results = await asyncio.get_running_loop().run_in_executor(
            self.worker, lambda: self.translate_nbest(lines, search, prefixes=prefixes, scores=False))
        at = 0
        for request_lines, _, _, future in batch:
            if not future.done():
                future.set_result(results[at:at + len(request_lines)])
            at += len(request_lines)


def create_app(translator, search: SearchConfig, limits: ServeLimits,
               worker: ThreadPoolExecutor | None = None) -> FastAPI:
    """The service around `translator` (anything with .info and .translate_nbest(lines, search, prefixes=,
    scores=)), decoding on `worker` (the thread that loaded the model, see `translation_thread`)."""
    src_lang, tgt_lang = translator.info.src_lang, translator.info.tgt_lang
    batcher = Batcher(translator.translate_nbest, search, limits, worker or translation_thread())

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="seq2seq", lifespan=lifespan,
                  description=f"{LANGUAGE_NAMES.get(src_lang, src_lang)} to {LANGUAGE_NAMES.get(tgt_lang, tgt_lang)} "
                              "translation, LibreTranslate's API")
    add_error_handlers(app, limits)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/languages")
    async def languages():
        return [{"code": src_lang, "name": LANGUAGE_NAMES.get(src_lang, src_lang), "targets": [tgt_lang]}]

    @app.post("/translate")
    async def translate(request: TranslateRequest):
        texts, prefixes = check_request(request, src_lang, tgt_lang, limits, search)
        results = await batcher.translate(texts, prefixes, request.alternatives + 1)
        best = [hyps[0][0] for hyps in results]
        alternatives = [[h for h, _ in hyps[1:request.alternatives + 1]] for hyps in results]
        single = isinstance(request.q, str)
        answer = {"translatedText": best[0] if single else best}
        if request.alternatives:
            answer["alternatives"] = alternatives[0] if single else alternatives
        return answer

    return app


def check_request(request: TranslateRequest, src_lang: str, tgt_lang: str, limits: ServeLimits,
                  search: SearchConfig) -> tuple[list[str], list[str] | None]:
    """The request's texts and prefixes (None: none given), or a BadRequest naming the field that is wrong."""
    if (request.source, request.target) != (src_lang, tgt_lang):
        raise BadRequest(400, f"source={request.source!r}, target={request.target!r}: this model translates "
                              f"{src_lang} to {tgt_lang}")
    if request.format != "text":
        raise BadRequest(400, f"format={request.format!r}: only text is supported")
    texts = [request.q] if isinstance(request.q, str) else request.q
    if len(texts) > limits.texts_limit:
        raise BadRequest(400, f"q: {len(texts)} texts exceed the limit of {limits.texts_limit} per request")
    for i, text in enumerate(texts):
        if len(text) > limits.char_limit:
            raise BadRequest(400, f"q[{i}]: {len(text)} characters exceed the limit of {limits.char_limit}")
        check_unicode(f"q[{i}]", text)
    if request.alternatives and search.sample:
        raise BadRequest(400, f"alternatives={request.alternatives}: this service samples one translation per text "
                              "(sample=true); alternatives need beam search")
    if request.alternatives + 1 > max(search.beam_size, 10):
        raise BadRequest(400, f"alternatives={request.alternatives}: at most {max(search.beam_size, 10) - 1}")
    return [" ".join(text.splitlines()) for text in texts], check_prefix(request, len(texts), limits)


def check_prefix(request: TranslateRequest, n: int, limits: ServeLimits) -> list[str] | None:
    """The request's prefixes, one per text, or a BadRequest: shaped like q, within the character limit."""
    if request.prefix is None:
        return None
    if isinstance(request.prefix, str) != isinstance(request.q, str) or \
            (isinstance(request.prefix, list) and len(request.prefix) != n):
        shape = "a text" if isinstance(request.q, str) else f"a list of {n}"
        raise BadRequest(400, f"prefix: give one per text, shaped like q ({shape})")
    prefixes = [request.prefix] if isinstance(request.prefix, str) else request.prefix
    for i, text in enumerate(prefixes):
        if len(text) > limits.char_limit:
            raise BadRequest(400, f"prefix[{i}]: {len(text)} characters exceed the limit of {limits.char_limit}")
        check_unicode(f"prefix[{i}]", text)
    return [" ".join(text.splitlines()) for text in prefixes]


def check_unicode(field: str, text: str) -> None:
    """JSON can carry a lone UTF-16 surrogate ("\\ud800"), which is no character: a 400, not a failed search."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(400, f"{field}: not valid Unicode (a lone surrogate at character {e.start})") from None


def add_error_handlers(app: FastAPI, limits: ServeLimits) -> None:
    @app.exception_handler(BadRequest)
    async def bad_request(_request, e: BadRequest):
        retry = {"Retry-After": "1"} if e.status == 503 else None  # busy, or a failed batch: worth another try
        return JSONResponse({"error": e.message}, status_code=e.status, headers=retry)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=400)

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.body_limit):
            return JSONResponse({"error": f"body: larger than {limits.body_limit} bytes"}, status_code=413)
        return await call_next(request)


def serve(cfg) -> None:
    import uvicorn

    from seq2seq.config import build_config, checkpoints, search_config
    from seq2seq.translator import load_translator

    search = search_config(cfg)
    limits = build_config(ServeLimits, {k: cfg[k] for k in ServeLimits.__dataclass_fields__}, "serve",
                          top_level=True)
    worker = translation_thread()
    translator = worker.submit(load_translator, cfg.backend, checkpoints(cfg.ckpt), search.device).result()
    worker.submit(translator.check, search).result()  # a precision the device lacks: one line, not a 500 per request
    uvicorn.run(create_app(translator, search, limits, worker), host=cfg.host, port=int(cfg.port), log_level="info",
                timeout_graceful_shutdown=30)
