"""Click commands `serve` and `bench-serve` (registered on the main CLI group in `cli.py`).

Only click is imported here: the serving libraries (the `serve` extra) load when a command runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from dream_export.errors import MissingBackendError


def _need_serve_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise MissingBackendError(f"serving needs the serve extra ({e.name} is missing): "
                                  "pip install 'dream-export[serve]'") from e


@click.command("serve")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True)
@click.option("--backend", default="onnxruntime", show_default=True,
              type=click.Choice(["onnxruntime", "onnxruntime-cuda", "tensorrt"]))
@click.option("--precision", default="fp32", show_default=True, help="Graph variant: fp32, fp16, cpu, ...")
@click.option("--threads", default="2", show_default=True,
              help="ONNX Runtime intra-op threads per pipeline: a number, or per graph, e.g. target=2,draft=1.")
@click.option("--mode", type=click.Choice(["tree", "chain", "ar"]), default=None,
              help="Drafting mode [the shape `dream-export search` chose for the bundle, else tree].")
@click.option("--tree", "tree_spec", default=None, help="K,DEPTH,TOTAL [the searched shape, else 4,6,32].")
@click.option("--model-name", default=None, help="The model id clients send [the bundle directory's name].")
@click.option("--allow-local-images", "local_images", default=None,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Also accept file:// image URLs, for files under this directory (off: data URLs only).")
@click.option("--replicas", type=int, default=None,
              help="Serve with Ray Serve: this many replicas, one pipeline each (one GPU each on GPU backends).")
@click.option("--max-replicas", type=int, default=None, help="Autoscale up to this many replicas under load.")
@click.option("--ray-address", default=None,
              help="Join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a local one.")
def serve_cmd(bundle: Path, host: str, port: int, backend: str, precision: str, threads: str, mode: str | None,
              tree_spec: str | None, model_name: str | None, local_images: Path | None, replicas: int | None,
              max_replicas: int | None, ray_address: str | None) -> None:
    """OpenAI-compatible HTTP server for a bundle: POST /v1/chat/completions (streaming), GET /v1/models,
    GET /health. With --replicas, the same app runs as a Ray Serve deployment."""
    _need_serve_extra()
    from dream_export.serve.app import ServeConfig

    config = ServeConfig(bundle.resolve(), backend, precision, threads, mode, tree_spec, model_name,
                         local_images.resolve() if local_images else None)
    if replicas is None and (max_replicas is not None or ray_address is not None):
        raise click.UsageError("--max-replicas and --ray-address go with --replicas")
    if replicas is not None:
        from dream_export.serve import ray_app

        click.echo(f"serving {config.name} on Ray Serve ({replicas} replica(s)) at http://{host}:{port}/v1",
                   err=True)
        ray_app.run(config, ray_app.Scaling(replicas, max_replicas), host, port, ray_address)
        return
    from dream_export.serve.app import Service, create_app
    from dream_export.serve.local import serve_forever

    service = Service.load(config)
    click.echo(f"serving {config.name} at http://{host}:{port}/v1", err=True)
    serve_forever(create_app(service), host, port)


@click.command("bench-serve")
@click.argument("url")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help='JSONL of {"image": path, "prompt": text} (as for `bench`).')
@click.option("-c", "--concurrency", multiple=True, type=int, default=(1,), show_default=True,
              help="Concurrent streaming clients; repeat for several levels (-c 1 -c 2 -c 4).")
@click.option("--requests", "n_requests", type=int, default=None, help="Requests per level [one per data row].")
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def bench_serve_cmd(url: str, data_path: Path, concurrency: tuple[int, ...], n_requests: int | None,
                    max_tokens: int, json_out: Path | None, plot_out: Path | None) -> None:
    """Load a running server with concurrent streaming clients: requests/s, time to first token,
    tokens/s per stream, p50/p95 latency."""
    from dream_export.core.prompts import read_prompts
    from dream_export.io import atomic_write_text
    from dream_export.serve.bench import bench_serve, plot

    summary = bench_serve(url, read_prompts(data_path), list(concurrency), n_requests, max_tokens,
                          log=lambda s: click.echo(s, err=True))
    if json_out:
        atomic_write_text(json_out, json.dumps(summary, indent=2))
    if plot_out:
        plot(summary, plot_out)
    click.echo(json.dumps({"levels": [{k: v for k, v in lv.items() if k != "samples"} for lv in summary["levels"]]},
                          sort_keys=True))


COMMANDS = [serve_cmd, bench_serve_cmd]
