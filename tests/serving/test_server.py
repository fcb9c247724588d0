"""qvl-export serve, driven by the real openai client against a real server on 127.0.0.1.

Every request has a client timeout (60 s) and no retries; every loop runs a fixed number of requests."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import openai
import pytest

from qvl_export.runtimes.pipeline import Pipeline
from tests.serving.conftest import MODEL, data_url, image_part, png_bytes, text, user


def _get(server, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _post(server, body: bytes, path: str = "/v1/chat/completions", headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _metric(server, name: str) -> float:
    _, body = _get(server, "/metrics")
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture(scope="module")
def pipe(serve_artifacts):
    return Pipeline.load(serve_artifacts, threads=1)


def _requests(media):
    """Four mixed requests (a data URL, two local images with a long prompt, text only, a local image) and their
    max_tokens."""
    return [(user(image_part(data_url(media / "a.png")), text("hello there")), 24),
            (user(image_part(str(media / "b.png")), image_part("file://" + str(media / "c.png")),
                  text("what is it and why so long a prompt here, tell me more")), 40),
            ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "text only"}], 16),
            (user(image_part("c.png"), text("Describe.")), 32)]


def _alone(pipe, media, messages, max_tokens, **kw):
    """What the runtime alone answers (images opened from the allowed folder, as the server resolves them)."""
    from qvl_export.serving.openai_api import Limits, parse_chat, resolve_media

    chat = parse_chat({"model": MODEL, "messages": messages}, MODEL, Limits(allowed_media=media))
    return pipe.generate(messages=resolve_media(chat, Limits(allowed_media=media)), max_new_tokens=max_tokens, **kw)


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, body = _get(server, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = _get(server, "/metrics")
    assert status == 200
    for name in ("qvl_requests_total", "qvl_generation_tokens_per_second", "qvl_queue_length", "qvl_batch_size",
                 "qvl_decode_batch_size_bucket", "qvl_time_to_first_token_seconds_sum"):
        assert name in body


def test_completions_streamed_and_not_equal_the_runtime_alone(server, client, pipe, media):
    for messages, max_tokens in _requests(media):
        alone = _alone(pipe, media, messages, max_tokens, temperature=0)
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
        assert r.choices[0].message.content == alone.text
        assert r.choices[0].finish_reason == alone.finish_reason
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (alone.prompt_tokens, len(alone.token_ids))
        pieces, finish, usage = [], None, None
        for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        assert "".join(pieces) == alone.text and finish == alone.finish_reason
        assert usage.completion_tokens == len(alone.token_ids)


def test_seeded_sampling_is_reproducible(client, pipe, media):
    messages, _ = _requests(media)[0]
    kw = dict(model=MODEL, messages=messages, max_tokens=20, temperature=0.9, top_p=0.9)
    a = client.chat.completions.create(seed=5, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=5, **kw).choices[0].message.content
    assert a == b == _alone(pipe, media, messages, 20, temperature=0.9, top_p=0.9, seed=5).text


def test_video_item_and_negative_seed(client, pipe, media):
    r = client.chat.completions.create(model=MODEL, messages=user({"type": "video", "video": "clip", "fps": 2.0},
                                                                  text("What happens?")),
                                       max_tokens=12, temperature=0)
    alone = pipe.generate(videos=[str(media / "clip")], prompt="What happens?", fps=2.0, max_new_tokens=12,
                          temperature=0)
    assert r.choices[0].message.content == alone.text and r.usage.prompt_tokens == alone.prompt_tokens
    r = client.chat.completions.create(model=MODEL, messages=user(text("hi")), max_tokens=4, temperature=1, seed=-3)
    assert r.usage.completion_tokens >= 1


BAD = [  # (body, status, words of the one-line reason)
    ({"messages": user(text("hi"))}, 400, "'model' is required"),
    ({"model": "gpt-4o", "messages": user(text("hi"))}, 404, "does not exist"),
    ({"model": MODEL}, 400, "'messages' must be"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "has role"),
    ({"model": MODEL, "messages": user({"type": "audio", "x": 1})}, 400, "has type"),
    ({"model": MODEL, "messages": user(text("hi")), "temperature": 3}, 400, "'temperature' must be"),
    ({"model": MODEL, "messages": user(text("hi")), "top_p": 0}, 400, "'top_p' must be"),
    ({"model": MODEL, "messages": user(text("hi")), "max_tokens": 0}, 400, "'max_tokens' must be"),
    ({"model": MODEL, "messages": user(text("hi")), "max_tokens": 301}, 400, "at most 300"),
    ({"model": MODEL, "messages": user(text("hi")), "n": 2}, 400, "'n' must be 1"),
    ({"model": MODEL, "messages": user(text("hi")), "stop": ["x"]}, 400, "'stop' sequences"),
    ({"model": MODEL, "messages": user(text("hi")), "frequency_penalty": 1}, 400, "not supported"),
    ({"model": MODEL, "messages": user(text("hi")), "stream": "yes"}, 400, "'stream' must be"),
    ({"model": MODEL, "messages": user(image_part("http://example.com/a.png"))}, 400, "not fetched"),
    ({"model": MODEL, "messages": user(image_part("data:image/png;base64,@@@"))}, 400, "invalid base64"),
    ({"model": MODEL, "messages": user(image_part("data:image/png;base64,aGVsbG8="))}, 400, "not a readable image"),
    ({"model": MODEL, "messages": user(image_part("../outside.png"))}, 400, "outside the folder"),
    ({"model": MODEL, "messages": user(image_part("/etc/hostname"))}, 400, "outside the folder"),
    ({"model": MODEL, "messages": user(image_part("missing.png"))}, 400, "not a file"),
    ({"model": MODEL, "messages": user(*[image_part("a.png")] * 4)}, 400, "at most 3 per request"),
    ({"model": MODEL, "messages": user(image_part("data:image/png;base64,"
                                                  + __import__("base64").b64encode(png_bytes((300, 200))).decode()))},
     400, "pixels"),
    ({"model": MODEL, "messages": user(text("hi " * 600))}, 400, "holds 512 tokens per sequence"),
    ({"model": MODEL, "messages": user(text("hi")), "max_tokens": 300, "x": 1}, 200, ""),  # unknown keys ignored
]


def test_bad_requests_get_one_line_reasons(server, client):
    before = _metric(server, 'qvl_requests_total{outcome="bad_request"}')
    for body, status, words in BAD:
        code, reply = _post(server, json.dumps(body).encode())
        assert code == status, (body, reply)
        if status != 200:
            message = reply["error"]["message"]
            assert words in message and "\n" not in message and "Traceback" not in message, message
    assert _metric(server, 'qvl_requests_total{outcome="bad_request"}') == before + sum(s >= 400 for _, s, _ in BAD)
    # not JSON, not an object, too large (declared and chunked), an unknown route, a wrong method
    assert _post(server, b"{not json")[0] == 400
    assert _post(server, b"[1, 2]")[1]["error"]["message"].startswith("the request body must be a JSON object")
    big = json.dumps({"model": MODEL, "messages": user(text("x" * (3 << 20)))}).encode()
    code, reply = _post(server, big)
    assert code == 413 and "at most 2097152" in reply["error"]["message"]
    with pytest.raises(openai.APIStatusError, match="at most 2097152") as err:  # the same through the client
        client.chat.completions.create(model=MODEL, messages=user(text("x" * (3 << 20))), max_tokens=4)
    assert err.value.status_code == 413
    assert _post(server, b"{}", path="/v1/completions")[0] == 404
    assert _get(server, "/v1/chat/completions")[0] == 405
    with pytest.raises(openai.BadRequestError, match="outside the folder"):
        client.chat.completions.create(model=MODEL, messages=user(image_part("../outside.png")), max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=user(text("hi")), max_tokens=4)
    assert json.loads(_get(server, "/health")[1])["status"] == "ok"


def _concurrently(calls):
    """Run the callables at once (a barrier), each in its own thread; their results in order."""
    barrier = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def run(i, call):
        barrier.wait(timeout=30)
        try:
            results[i] = call()
        except Exception as err:  # noqa: BLE001 - the test looks at what each call got
            results[i] = err

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads)
    return results


def test_concurrent_requests_are_batched_and_answer_as_alone(server, client, media):
    cases = _requests(media) * 2  # 8 requests on 4 rows: rows join as others leave
    single = [client.chat.completions.create(model=MODEL, messages=m, max_tokens=n + 64, temperature=0)
              for m, n in cases[:4]]
    steps, rows = _metric(server, "qvl_decode_steps_total"), _metric(server, "qvl_decode_batch_size_sum")
    results = _concurrently([lambda m=m, n=n: client.chat.completions.create(model=MODEL, messages=m,
                                                                              max_tokens=n + 64, temperature=0)
                             for m, n in cases])
    for i, r in enumerate(results):
        assert r.choices[0].message.content == single[i % 4].choices[0].message.content
        assert r.usage.completion_tokens == single[i % 4].usage.completion_tokens
    mean_batch = (_metric(server, "qvl_decode_batch_size_sum") - rows) / (_metric(server, "qvl_decode_steps_total")
                                                                           - steps)
    assert _metric(server, "qvl_batch_size_peak") > 1 and mean_batch > 1, mean_batch


def test_a_failing_request_among_good_ones(server, client, media):
    messages, n = _requests(media)[1]
    good = lambda: client.chat.completions.create(model=MODEL, messages=messages, max_tokens=n, temperature=0)  # noqa
    expected = good().choices[0].message.content
    bad_image = lambda: client.chat.completions.create(  # noqa: E731 - bytes that are no image
        model=MODEL, messages=user(image_part("data:image/png;base64,aGVsbG8="), text("x")), max_tokens=8)
    too_long = lambda: client.chat.completions.create(  # noqa: E731 - over the context
        model=MODEL, messages=user(text("word " * 500)), max_tokens=8, stream=True)
    results = _concurrently([good, bad_image, good, too_long, good])
    assert [r.choices[0].message.content for r in results[::2]] == [expected] * 3
    assert isinstance(results[1], openai.BadRequestError) and "not a readable image" in results[1].message
    assert isinstance(results[3], openai.BadRequestError) and "tokens per sequence" in results[3].message
    assert json.loads(_get(server, "/health")[1])["status"] == "ok"
    assert good().choices[0].message.content == expected


def test_a_client_that_leaves_mid_stream_frees_its_row(server, client, media):
    messages, _ = _requests(media)[2]
    before = _metric(server, 'qvl_requests_total{outcome="cancelled"}')
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=300, temperature=0.8, seed=1,
                                            stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    import time

    deadline = time.monotonic() + 10
    while _metric(server, "qvl_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server, "qvl_requests_running") == 0
    assert _metric(server, 'qvl_requests_total{outcome="cancelled"}') in (before, before + 1)  # or it had finished
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1
