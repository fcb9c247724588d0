"""``qvl-export serve ART``: the click command (fastapi / uvicorn imported only when it runs)."""

from __future__ import annotations

from pathlib import Path

import click

from qvl_export.serving import openai_api as api


@click.command()
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the server to the network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1),
              help="Sequences decoded together (continuous batching; 1 for the concat-KV / trt decoder).")
@click.option("--context", default=None, type=click.IntRange(16),
              help="KV rows per sequence: prompt + new tokens [default: min(model context, 4096)]. "
                   "max-batch x context rows are allocated at start.")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(1),
              help="Requests waiting for a row before new ones get 503.")
@click.option("--allowed-media", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Folder whose images and videos requests may name by local path (default: none; data: URLs only).")
@click.option("--max-images", default=8, show_default=True, type=click.IntRange(1),
              help="Images and videos per request.")
@click.option("--max-image-pixels", default=api.Limits.max_image_pixels, show_default=True, type=click.IntRange(1),
              help="Pixels of an image as sent (checked from its header before decoding).")
@click.option("--max-video-frames", default=64, show_default=True, type=click.IntRange(2),
              help="Frames kept per video.")
@click.option("--max-tokens", default=None, type=click.IntRange(1), help="Cap on a request's max_tokens.")
@click.option("--max-body-mb", default=32.0, show_default=True, type=click.FloatRange(0.001),
              help="Request body size limit (MiB).")
@click.option("--model-name", default=None, help="The model id clients send [default: the artifacts folder's name].")
@click.option("--threads", default=None, type=click.IntRange(1), help="onnxruntime intra-op threads.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default=None)
@click.option("--skip-verify", is_flag=True, help="Do not check the artifacts' files against the manifest's sha256.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run --replicas copies of the server on Ray Serve (a local Ray instance, or RAY_ADDRESS's "
                   "cluster); needs pip install \"ray[serve]\".")
@click.option("--replicas", default=2, show_default=True, type=click.IntRange(1), help="--ray: server replicas.")
@click.option("--replica-cpus", default=1.0, show_default=True, type=click.FloatRange(0.0, min_open=True),
              help="--ray: CPUs Ray reserves per replica.")
def serve(artifacts, host, port, max_batch, context, max_queue, allowed_media, max_images, max_image_pixels,
          max_video_frames, max_tokens, max_body_mb, model_name, threads, backend, skip_verify, use_ray, replicas,
          replica_cpus):
    """Serve ARTIFACTS as an OpenAI-compatible chat completions endpoint (/v1/chat/completions, /v1/models,
    /health, /metrics), decoding concurrent requests in one continuous batch (--ray: on Ray Serve replicas)."""
    from qvl_export.serving.server import ServeOptions, require_serve_extra, serve as run_server

    require_serve_extra()
    limits = api.Limits(max_body_bytes=int(max_body_mb * api.MiB), max_images=max_images,
                        max_image_pixels=max_image_pixels, max_video_frames=max_video_frames, max_tokens=max_tokens,
                        allowed_media=allowed_media)
    options = ServeOptions(max_batch=max_batch, context=context, max_queue=max_queue, threads=threads,
                           backend=backend, verify=not skip_verify, model_name=model_name, limits=limits)
    if use_ray:
        from qvl_export.core.manifest import Manifest
        from qvl_export.serving import ray as ray_serve

        ray_serve.require_ray()
        Manifest.read(artifacts)  # a bad folder is one line here, not a replica failing to start
        ray_serve.run(artifacts, options, replicas=replicas, host=host, port=port, cpus_per_replica=replica_cpus)
        return
    run_server(artifacts, host=host, port=port, options=options)
