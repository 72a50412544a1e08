"""The same app as a Ray Serve deployment: one `Pipeline` per replica, replicas spread over a Ray cluster.

Each replica runs whole requests: the speculative loop's per-round calls take milliseconds and its KV
cache lives in the replica, so splitting a request across processes would cost more than it saves.
Ray Serve's proxy routes each request to a replica and scales replicas between the bounds given.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

from dream_export.errors import MissingBackendError, UsageError
from dream_export.serve.app import ServeConfig

GPU_BACKENDS = ("onnxruntime-cuda", "tensorrt")
APP_NAME = "dream-export"


@dataclass
class Scaling:
    """Replica bounds: `replicas` always, up to `max_replicas` under load (autoscaling)."""

    replicas: int = 1
    max_replicas: int | None = None
    # requests one replica holds at once (one decodes, the rest wait in its queue); autoscaling aims
    # at `target_ongoing` per replica
    max_ongoing: int = 8
    target_ongoing: float = 2.0

    def options(self) -> dict:
        if self.replicas < 1 or (self.max_replicas is not None and self.max_replicas < self.replicas):
            raise UsageError("need 1 <= replicas <= max replicas (--replicas, --max-replicas)")
        opts: dict = {"max_ongoing_requests": self.max_ongoing}
        if self.max_replicas is None or self.max_replicas == self.replicas:
            opts["num_replicas"] = self.replicas
        else:
            opts["autoscaling_config"] = {"min_replicas": self.replicas, "max_replicas": self.max_replicas,
                                          "initial_replicas": self.replicas,
                                          "target_ongoing_requests": self.target_ongoing}
        return opts


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise MissingBackendError("--replicas needs Ray Serve: pip install 'dream-export[serve]'") from e
    return ray, serve


def application(config: ServeConfig, scaling: Scaling, num_cpus: float | None = None):
    """The bound Ray Serve application (pass to `serve.run`)."""
    _ray_mod, serve = _ray()
    from dream_export.serve.app import Service, create_app

    gpus = 1 if config.backend in GPU_BACKENDS else 0  # one pipeline per GPU
    cpus = num_cpus if num_cpus is not None else (float(config.threads) if config.threads.isdigit() else 1.0)

    @serve.deployment(name="DreamExport", ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
                      **scaling.options())
    @serve.ingress()
    class Replica:
        def __init__(self, cfg: ServeConfig):
            self.service = Service.load(cfg)

        def __serve_build_asgi_app__(self):
            return create_app(self.service)

    return Replica.bind(config)


def app_builder(args: dict):
    """Ray Serve application builder, for config files and KubeRay's RayService (`import_path:
    dream_export.serve.ray_app:app_builder`) or `serve run dream_export.serve.ray_app:app_builder
    bundle=/models/bundle replicas=2`. Keys: bundle (required), backend, precision, threads, mode, tree,
    model_name, local_images, replicas, max_replicas."""
    if "bundle" not in args:
        raise UsageError("the application needs a bundle argument (bundle=/path/to/bundle)")
    known = ("backend", "precision", "threads", "mode", "tree", "model_name", "local_images")
    unknown = set(args) - {"bundle", "replicas", "max_replicas", *known}
    if unknown:
        raise UsageError(f"unknown application argument(s): {', '.join(sorted(unknown))}")
    config = ServeConfig(Path(args["bundle"]), **{k: str(args[k]) for k in known if args.get(k) is not None})
    if config.local_images:
        config.local_images = Path(config.local_images)
    mx = args.get("max_replicas")
    return application(config, Scaling(int(args.get("replicas", 1)), int(mx) if mx is not None else None))


def run(config: ServeConfig, scaling: Scaling, host: str, port: int, address: str | None = None,
        blocking: bool = True, num_cpus: float | None = None, runtime_env: dict | None = None) -> None:
    """Start (or join, with `address`) a Ray cluster and serve the app on http://host:port/v1."""
    ray, serve = _ray()
    if not ray.is_initialized():
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(config, scaling, num_cpus), name=APP_NAME, route_prefix="/")
    if not blocking:
        return
    # Until Ctrl-C or SIGTERM (how process managers and Kubernetes stop a process); then remove the app,
    # and a Ray instance this process started goes down with it.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
        if address is None:
            serve.shutdown()
        ray.shutdown()


def _interrupt(*_) -> None:
    raise KeyboardInterrupt
