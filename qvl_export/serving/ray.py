"""Scale-out on Ray Serve: N replicas of the same server app, each loading the artifacts once.

    qvl-export serve ART --ray --replicas 2 [--port 8000]        # a local Ray instance, or RAY_ADDRESS's cluster

Each replica is a Ray actor that builds ``create_app(state)`` - its own Pipeline, scheduler thread and
continuous batch - when it starts (``serve.ingress`` with a builder, evaluated on the replica); Ray
Serve's proxy spreads the HTTP requests over the replicas and restarts a replica that dies, while the
others keep answering. The routes, limits and metrics are those of ``qvl-export serve`` (each replica's
/metrics are its own). Imported only when used: ``pip install "ray[serve]"``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qvl_export.core.errors import QvlError

log = logging.getLogger(__name__)

DEPLOYMENT = "QvlServer"


def require_ray():
    try:
        import ray
        from ray import serve
    except ModuleNotFoundError as err:
        raise QvlError(f"'qvl-export serve --ray' needs Ray Serve ({err.name} is not installed): "
                       'pip install "ray[serve]"') from None
    return ray, serve


def application(artifacts: str | Path, options, replicas: int = 2, cpus_per_replica: float = 1.0):
    """The Ray Serve application: ``replicas`` copies of the server app over ``artifacts``."""
    _, serve = require_ray()
    artifacts = str(Path(artifacts).resolve())

    def build_app():  # runs on each replica when it starts: the artifacts load once per replica
        from qvl_export.serving.app import create_app
        from qvl_export.serving.server import build_state

        state = build_state(artifacts, options)
        state.scheduler.start()
        return create_app(state)

    deployment = serve.deployment(serve.ingress(build_app)(), name=DEPLOYMENT, num_replicas=replicas,
                                  ray_actor_options={"num_cpus": cpus_per_replica},
                                  max_ongoing_requests=max(16, 4 * options.max_batch),
                                  health_check_period_s=2, health_check_timeout_s=30)
    return deployment.bind()


def build(args: dict):
    """Application builder for Ray Serve's config files and CLI (KubeRay's RayService uses the same):
    ``serve run qvl_export.serving.ray:build artifacts=/models/q25 replicas=2 max_batch=8``. Keys: artifacts
    (required), replicas, replica_cpus, max_batch, context, threads, model_name, allowed_media."""
    from qvl_export.serving import openai_api as api
    from qvl_export.serving.server import ServeOptions

    if not args.get("artifacts"):
        raise QvlError("the Ray Serve application needs artifacts=PATH (an artifacts folder on every node).")

    def number(key, kind, default):
        try:
            return kind(args[key]) if args.get(key) not in (None, "") else default
        except (TypeError, ValueError):
            raise QvlError(f"{key}={args[key]!r} must be {'an integer' if kind is int else 'a number'}.") from None

    limits = api.Limits(allowed_media=Path(args["allowed_media"]) if args.get("allowed_media") else None)
    options = ServeOptions(max_batch=number("max_batch", int, 8), context=number("context", int, None),
                           threads=number("threads", int, None), model_name=args.get("model_name") or None,
                           limits=limits)
    return application(args["artifacts"], options, number("replicas", int, 2), number("replica_cpus", float, 1.0))


PROXY_READY_S = "60"  # Serve's default is 5 s


def allow_slow_proxy_start() -> None:
    """Give Serve's HTTP proxy a minute to report ready before its controller kills and restarts it.
    On a small, busy machine (2 cores, a model loading beside it) the proxy's worker process takes more
    than Serve's default 5 s to start, and ``serve.start`` fails with the killed proxy. Read by the
    Ray processes started after this call (set before ``ray.init``); a value already in the
    environment is kept."""
    import os

    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", PROXY_READY_S)


def run(artifacts: str | Path, options, replicas: int = 2, host: str = "127.0.0.1", port: int = 8000,
        cpus_per_replica: float = 1.0, blocking: bool = True):
    """Start Serve's proxy on ``host:port`` and deploy the application (blocks until interrupted when
    ``blocking``). Connects to the cluster in RAY_ADDRESS when set, else starts a local Ray instance."""
    ray, serve = require_ray()
    if not ray.is_initialized():
        allow_slow_proxy_start()
        ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(artifacts, options, replicas, cpus_per_replica), name="qvl", route_prefix="/",
              blocking=blocking)


def replica_actors() -> list:
    """The replicas' actor handles (named actors in Serve's namespace), e.g. to stop one."""
    ray, _ = require_ray()
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == "serve" and a["name"].startswith("SERVE_REPLICA") and DEPLOYMENT in a["name"]]
    return [ray.get_actor(name, namespace="serve") for name in sorted(names)]
