"""`python -m flan_squad.serve` as a user runs it: a real server process on a free local port, spoken to by a real
HTTP client (urllib), against `flan_squad.predict` and the run's own predictions.json on the same questions.

One tiny SQuAD v2 run (random init, trained briefly here, contexts long enough for windows): equality is what matters.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks import serve_load
from conftest import SHARED, compose_config, subprocess_env
from flan_squad.data.squad import read_squad_file
from flan_squad.evaluation.metrics import apply_threshold, score
from flan_squad.predict import predict
from flan_squad.runs.answering import Answerer
from flan_squad.train import train
from flan_squad.utils.errors import ConfigError

# fp32 also where the CPU has native bf16: answers compared across batchings are equal in exact arithmetic only.
RUN = ["experiment=smoke", "dataset=squad_v2", "dataset.limit_train=8", "dataset.limit_val=8",
       "dataset.max_source_length=128", "eval.stride=32", "eval.max_new_tokens=6", "trainer.precision=32-true",
       "trainer.max_epochs=1", "logger=none"]
MAX_CONTEXT = 5000


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("served_run")
    train(compose_config(RUN, output_dir=run_dir, cache=cache_dir))
    return run_dir


@pytest.fixture(scope="module")
def questions(run_dir):
    """The run's validation questions (their contexts need several 128-token windows)."""
    scored = json.loads((run_dir / "predictions.json").read_text())
    return [q for q in read_squad_file(SHARED / "data/squad/v2.0/dev-v2.0.reconstructed.json")[1] if q.id in scored]


def _call(url: str, body: bytes | None = None, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _ask(url: str, q, **fields) -> tuple[int, dict]:
    body = {"id": q.id, "question": q.question, "context": q.context, **fields}
    return _call(f"{url}/answer", json.dumps(body).encode())


def _post_refused_early(url: str, body: bytes) -> tuple[int, dict]:
    """POST a body that the server refuses from its headers alone: it replies and closes the connection while the
    body may still be on its way (the send then breaks), so the reply is read whatever the send did."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        connection.putrequest("POST", parts.path)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.send(body)
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        connection.close()


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """The server on a free port, as `python -m flan_squad.serve run_dir=...` starts it; killed if a test left it."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    # max_wait_ms: long enough that the concurrent requests below are gathered even on a loaded machine
    url, process = serve_load.serve([f"run_dir={run_dir}", "precision=32-true", "max_wait_ms=300",
                                     f"max_context_chars={MAX_CONTEXT}"], log, env=subprocess_env())
    yield url, process, log
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_concurrent_answers_are_predicts_and_the_runs_own(server, run_dir, questions, tmp_path, cache_dir):
    url, _, _ = server
    with ThreadPoolExecutor(len(questions)) as pool:  # all at once: the server gathers them into batches
        replies = list(pool.map(lambda q: _ask(url, q), questions))
    assert all(status == 200 for status, _ in replies), replies
    served = {reply["id"]: reply["answer"] for _, reply in replies}

    input_file = tmp_path / "questions.jsonl"
    input_file.write_text("\n".join(json.dumps({"id": q.id, "question": q.question, "context": q.context})
                                    for q in questions), encoding="utf-8")
    # predict with nothing but the run dir: the run's own windows, lengths and snapping, as the server answers
    predicted = predict(compose_config([f"run_dir={run_dir}", f"input_file={input_file}", "precision=32-true"],
                                       config_name="predict", cache=cache_dir))
    assert served == predicted == json.loads((run_dir / "predictions.json").read_text())
    na_probs = json.loads((run_dir / "na_probs.json").read_text())
    assert {r["id"]: r["no_answer_probability"] for _, r in replies} == pytest.approx(na_probs, rel=1e-4, abs=1e-9)

    status, health = _call(f"{url}/health")
    assert status == 200 and health["requests_answered"] == len(questions)
    assert health["batches"] < len(questions)  # gathered: fewer generate passes than requests
    assert (health["squad_version"], health["max_source_length"], health["stride"]) == ("v2", 128, 32)
    assert "random-init" in health["note"] and health["no_answer_threshold"] is None


def test_bad_requests_get_one_line_and_the_server_goes_on(server, questions):
    url, _, _ = server
    q = questions[0]
    refused = {
        "not JSON": _call(f"{url}/answer", b'{"question": "Who?", "context": '),
        "no context": _call(f"{url}/answer", json.dumps({"question": "Who?"}).encode()),
        "not an object": _call(f"{url}/answer", b'["Who?", "Paris."]'),
        "a number": _call(f"{url}/answer", json.dumps({"question": 3, "context": "Paris."}).encode()),
        "a typo": _call(f"{url}/answer", json.dumps({"question": "Who?", "contxt": "Paris."}).encode()),
        "long context": _ask(url, q, context="word " * (MAX_CONTEXT // 5 + 1)),
        "huge body": _post_refused_early(f"{url}/answer", json.dumps({"id": q.id, "question": q.question,
                                                                      "context": "x" * 1_000_000}).encode()),
        "long question": _ask(url, q, question="why " * 200),  # fits 1000 characters, not the 128-token input
    }
    statuses = {name: status for name, (status, _) in refused.items()}
    assert statuses == {"not JSON": 400, "no context": 422, "not an object": 422, "a number": 422, "a typo": 422,
                        "long context": 422, "huge body": 413, "long question": 422}
    errors = {name: reply["error"] for name, (_, reply) in refused.items()}
    assert all(len(e.splitlines()) == 1 and 0 < len(e) < 300 for e in errors.values()), errors
    assert errors["not JSON"].startswith("the request body is not valid JSON")
    assert errors["no context"] == "context: Field required"
    assert errors["a typo"] == "context: Field required; contxt: Extra inputs are not permitted"
    assert errors["long context"] == (f"context: String should have at most {MAX_CONTEXT} characters "
                                      f"(the server's max_context_chars)")
    assert "128-token" in errors["long question"]

    status, reply = _ask(url, q)  # still serving, and as before
    assert status == 200 and reply["id"] == q.id
    assert _call(f"{url}/health")[1]["status"] == "ok"


def test_the_load_benchmark_measures_this_server(server, questions):
    url, _, _ = server
    before = _call(f"{url}/health")[1]
    bodies = [{"id": q.id, "question": q.question, "context": q.context} for q in questions[:6]]
    row = serve_load.load(url, bodies, concurrency=3)
    assert (row["requests"], row["ok"], row["failed"]) == (6, 6, 0)
    assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["max_ms"] and row["requests_per_s"] > 0
    assert row["batches"] > before["batches"]  # what /health counted, read back


def test_the_api_schema_and_a_clean_stop(server):
    url, process, log = server
    status, schema = _call(f"{url}/openapi.json")
    assert status == 200 and {"/answer", "/health"} <= set(schema["paths"])
    request = schema["components"]["schemas"]["AnswerRequest"]
    assert request["required"] == ["question", "context"]
    assert request["properties"]["context"]["maxLength"] == MAX_CONTEXT
    assert {"400", "413", "422"} <= set(schema["paths"]["/answer"]["post"]["responses"])

    os.killpg(process.pid, signal.SIGTERM)
    # uvicorn shuts down gracefully, then ends by the signal it was sent (as a process manager expects)
    assert process.wait(timeout=60) == -signal.SIGTERM, log.read_text()[-3000:]
    assert "Application shutdown complete" in log.read_text()
    assert "Uvicorn running on http://127.0.0.1:" in log.read_text()  # bound to this machine only (the default)


def test_a_runs_threshold_answers_as_its_best_f1(run_dir, questions, cache_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    predictions = json.loads((run_dir / "predictions.json").read_text())
    na_probs = json.loads((run_dir / "na_probs.json").read_text())
    # the answers at the run's threshold, scored plainly, are its best_f1
    thresholded = apply_threshold(predictions, na_probs, metrics["best_f1_thresh"])
    assert score("v2", questions, thresholded)["f1"] == pytest.approx(metrics["best_f1"])

    settings = [f"run_dir={run_dir}", "precision=32-true", "no_answer_threshold=best"]
    answerer = Answerer.from_config(compose_config(settings, config_name="predict", cache=cache_dir))
    assert answerer.threshold == metrics["best_f1_thresh"]
    answers = answerer.answer(questions)
    assert answers.predictions == {q.id: "" if answers.na_probs[q.id] > answerer.threshold else predictions[q.id]
                                   for q in questions}
    with pytest.raises(ConfigError, match=r"no_answer_threshold=1.5: expected null, best, or a probability"):
        Answerer.from_config(compose_config([f"run_dir={run_dir}", "no_answer_threshold=1.5"], config_name="predict",
                                            cache=cache_dir))


def test_a_bad_run_dir_is_one_line(tmp_path, run_entry_point):
    result = run_entry_point("flan_squad.serve", [f"run_dir={tmp_path}"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: run_dir={tmp_path}: no config.yaml there: not a run dir "
                                                  f"written by flan_squad.train"]
