"""Ray Serve scale-out: 2 replicas of the server app on a local Ray instance (127.0.0.1), requests spread over
both, one replica killed mid-run while the other keeps answering. Bounded: a fixed number of requests, each
with a timeout; Ray is shut down at the end."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


@pytest.fixture(scope="module")
def ray_app(serve_artifacts):
    from qvl_export.serving import ray as qray
    from qvl_export.serving.loadtest import free_port
    from qvl_export.serving.server import ServeOptions

    qray.allow_slow_proxy_start()  # as `serve --ray` starts its local instance: a busy CI machine is slow
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = ServeOptions(max_batch=2, context=256, threads=1, model_name="m", verify=False)
        serve.run(qray.application(serve_artifacts, options, replicas=2, cpus_per_replica=0.5), name="qvl",
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _health(url):
    return json.loads(urllib.request.urlopen(url + "/health", timeout=30).read())


def _chat(url, prompt="hi"):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=60).read())["choices"][0]["message"]["content"]


def test_two_replicas_share_requests_and_survive_a_killed_one(ray_app, serve_artifacts):
    from qvl_export.runtimes.pipeline import Pipeline
    from qvl_export.serving import ray as qray

    pids = {_health(ray_app)["pid"] for _ in range(20)}
    assert len(pids) == 2  # both replicas answer
    expected = Pipeline.load(serve_artifacts, threads=1).generate(prompt="hi", max_new_tokens=8, temperature=0).text
    assert _chat(ray_app) == expected

    replicas = qray.replica_actors()
    assert len(replicas) == 2
    outcomes: list[tuple[float, bool]] = []
    stop = threading.Event()

    def load():  # requests keep coming while a replica is killed (bounded: 300 requests at most)
        for _ in range(300):
            if stop.is_set():
                return
            try:
                ok = _chat(ray_app) == expected
            except OSError:
                ok = False
            outcomes.append((time.monotonic(), ok))
            time.sleep(0.02)

    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(0.5)
    killed_at = time.monotonic()
    ray.kill(replicas[0], no_restart=False)
    time.sleep(3)
    stop.set()
    thread.join(120)
    assert not thread.is_alive()
    after = [ok for t, ok in outcomes if t > killed_at + 0.5]
    assert len(after) >= 5 and all(after), outcomes  # the other replica kept answering
    failed = sum(not ok for _, ok in outcomes)
    print(f"ray: {len(outcomes)} requests during the run, {failed} failed, {len(after)} after the kill all answered")
    assert failed <= 2  # at most the requests in flight on the killed replica
    deadline = time.monotonic() + 60  # Serve replaces the killed replica
    while len(qray.replica_actors()) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _chat(ray_app) == expected


def test_application_builder_reads_its_args(serve_artifacts):
    from qvl_export.core.errors import QvlError
    from qvl_export.serving import ray as qray

    app = qray.build({"artifacts": str(serve_artifacts), "replicas": "3", "max_batch": "4"})
    assert isinstance(app, serve.Application)
    with pytest.raises(QvlError, match="artifacts=PATH"):
        qray.build({})
    with pytest.raises(QvlError, match="replicas='two' must be an integer"):
        qray.build({"artifacts": "x", "replicas": "two"})

