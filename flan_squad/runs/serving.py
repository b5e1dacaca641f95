"""The HTTP API of `python -m flan_squad.serve` (FastAPI, run by uvicorn): see docs/serving.md.

- `POST /answer` `{"question", "context", "id"?}` -> `{"id", "answer", "no_answer_probability"}`: answered by an
  `Answerer` (flan_squad/runs/answering.py), the answering path of `flan_squad.predict`, so the same inputs get the
  same answers ("" means no answer).
- `GET /health`: the model, its answering settings, and how many requests and batches were answered.
- `GET /openapi.json` (and `/docs`): the API schema, limits included.

`Batcher` gathers the requests that arrive within `max_wait_ms` of the first waiting one, up to `max_batch`, into one
`Answerer.answer` call on one worker thread (the model answers one batch at a time; the event loop keeps accepting).
A bad request gets a 4xx with a one-line `{"error": ...}`, and never reaches the model.
"""

# No `from __future__ import annotations`: FastAPI reads the request and response models from the route functions'
# annotations, and those models are made inside `make_app` (their limits are the server's options).
import asyncio
import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from flan_squad.data.squad import DataError, Question
from flan_squad.evaluation.inference import Answers


class Batcher:
    """One `answer(questions)` call for the questions that arrive together (see the module's docstring)."""

    def __init__(self, answer: Callable[[Sequence[Question]], Answers], max_batch: int, max_wait_ms: float):
        self.answer, self.max_batch, self.max_wait_s = answer, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue | None = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="answer")
        self.requests = self.batches = 0

    async def submit(self, question: Question) -> tuple[str, float | None]:
        """The answer to `question` and its no-answer probability (SQuAD v2; else None)."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((question, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if not self.queue.empty():  # those already waiting join at once, whatever max_wait_ms
                    batch.append(self.queue.get_nowait())
                    continue
                if loop.time() >= deadline:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
            waiting = [(q, f) for q, f in batch if not f.done()]  # a client that hung up cancelled its future
            if not waiting:
                continue
            try:
                answers = await loop.run_in_executor(self.worker, self.answer, [q for q, _ in waiting])
            except Exception as e:  # answered as a 500 to each of them; the server goes on
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.requests, self.batches = self.requests + len(waiting), self.batches + 1
            for question, future in waiting:
                if not future.done():
                    na_prob = answers.na_probs[question.id] if answers.na_probs is not None else None
                    future.set_result((answers.predictions[question.id], na_prob))

    @asynccontextmanager
    async def running(self):
        self.queue = asyncio.Queue()
        task = asyncio.create_task(self.run())
        try:
            yield
        finally:
            task.cancel()
            self.worker.shutdown(wait=True)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def _validation_message(error: RequestValidationError) -> tuple[int, str]:
    """One line for pydantic's complaints: 400 for a body that is not JSON, else 422 naming each field (at most 3)."""
    errors = error.errors()
    loc = errors[0].get("loc", ())
    if errors[0].get("type") == "json_invalid":
        at = f" at character {loc[1]}" if len(loc) > 1 else ""
        return 400, f"the request body is not valid JSON ({(errors[0].get('ctx') or {}).get('error', 'JSON')}{at})"
    parts = []
    for e in errors[:3]:
        field = ".".join(str(part) for part in e.get("loc", ()) if part != "body")
        if not field:
            return 422, f"the request body must be a JSON object {{\"question\": ..., \"context\": ...}} ({e['msg']})"
        limit = f" (the server's max_{field}_chars)" if e.get("type") == "string_too_long" and field != "id" else ""
        parts.append(f"{field}: {e['msg']}{limit}")
    return 422, "; ".join(parts)


def make_app(answerer, max_batch: int = 16, max_wait_ms: float = 5, max_context_chars: int = 20000,
             max_question_chars: int = 1000) -> FastAPI:
    """The API around `answerer` (a `flan_squad.runs.answering.Answerer`)."""

    class AnswerRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        question: str = Field(min_length=1, max_length=max_question_chars, description="The question.")
        context: str = Field(min_length=1, max_length=max_context_chars,
                             description="The passage to answer from; a long one is read in overlapping windows.")
        id: str | None = Field(None, max_length=200, description="Any id of yours, returned with the answer.")

    class AnswerResponse(BaseModel):
        id: str | None
        answer: str = Field(description='The answer, a span of the context; "" means the context does not say.')
        no_answer_probability: float | None = Field(
            description="SQuAD v2 runs: P(no answer) / (P(no answer) + P(answer)); null for v1 runs.")

    batcher = Batcher(answerer.answer, max_batch, max_wait_ms)
    max_body = 8 * (max_context_chars + max_question_chars) + 4096  # JSON escapes may take 6 bytes a character
    numbers = itertools.count()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with batcher.running():
            yield

    app = FastAPI(title="flan-squad", lifespan=lifespan,
                  description="Answers SQuAD-style questions as the run's scores were computed (docs/serving.md).")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error(*_validation_message(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, error.detail)

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > max_body:
            return _error(413, f"the request body is {size} bytes: this server takes at most {max_body} "
                               f"(contexts up to {max_context_chars} characters)")
        return await call_next(request)

    @app.post("/answer", response_model=AnswerResponse, responses={
        400: {"description": "The body is not JSON."},
        413: {"description": "The body is too large."},
        422: {"description": "A field is missing, has the wrong type, or is too long (a context over "
                             f"{max_context_chars} characters)."}})
    async def answer(request: AnswerRequest) -> AnswerResponse:
        question = Question(f"request-{next(numbers)}", request.question, request.context, ())
        try:
            answerer.check(question)  # before batching: a question that cannot be posed fails alone
        except DataError:
            return _error(422, f"question: too long to leave room for any context in this model's "
                               f"{answerer.max_source_length}-token input")
        try:
            text, na_prob = await batcher.submit(question)
        except Exception as e:
            return _error(500, f"answering failed: {type(e).__name__}{f': {e}' if str(e) else ''}".splitlines()[0])
        return AnswerResponse(id=request.id, answer=text, no_answer_probability=na_prob)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **answerer.describe(), "requests_answered": batcher.requests,
                "batches": batcher.batches, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
                "max_context_chars": max_context_chars, "max_question_chars": max_question_chars}

    return app
