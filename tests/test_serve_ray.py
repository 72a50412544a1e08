"""`dream-export serve --replicas 2`: the same app as a Ray Serve deployment on a local Ray instance (CPU)."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the serve extra is not installed")
ray = pytest.importorskip("ray", reason="the serve extra is not installed")

from ray import serve  # noqa: E402

from dream_export.demo import scenes  # noqa: E402
from dream_export.serve import ray_app  # noqa: E402
from dream_export.serve.app import ServeConfig  # noqa: E402
from dream_export.serve.protocol import REPLICA, REPLICA_HEADER, data_url  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replica_processes_answer_like_the_pipeline(demo_bundle, demo_pipeline):
    scene, s = scenes.make_sample(scenes.HELDOUT_SEED_BASE + 11, "describe")
    img = scenes.render(scene)
    want = demo_pipeline.generate(img, s.prompt, max_new_tokens=24).text
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                                 {"type": "text", "text": s.prompt}]}]

    port = _free_port()
    # the replicas import this checkout of dream_export, whatever is installed
    root = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": root}},
             log_to_driver=False)
    try:
        ray_app.run(ServeConfig(demo_bundle, threads="1"), ray_app.Scaling(2), "127.0.0.1", port, blocking=False,
                    num_cpus=0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id

        def ask(_):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=messages, max_tokens=24, temperature=0.0)
            res = raw.parse()
            assert res.model_extra["speculation"]["replica"] == raw.headers[REPLICA_HEADER]
            return raw.headers[REPLICA_HEADER], res.choices[0].message.content

        replicas, answers = set(), []
        with ThreadPoolExecutor(4) as pool:
            for _ in range(5):  # Ray routes each request to the less busy of two replicas it picks
                got = list(pool.map(ask, range(8)))
                replicas |= {r for r, _ in got}
                answers += [a for _, a in got]
                if len(replicas) == 2:
                    break
        assert len(replicas) == 2 and REPLICA not in replicas  # two processes, neither of them this one
        assert set(answers) == {want}
    finally:
        serve.shutdown()
        ray.shutdown()


def test_application_builder_for_config_files_and_kuberay(demo_bundle):
    from dream_export.errors import UsageError

    app = ray_app.app_builder({"bundle": str(demo_bundle), "replicas": "2", "max_replicas": "4", "threads": 1})
    assert isinstance(app, serve.Application)
    with pytest.raises(UsageError, match="replica_count"):
        ray_app.app_builder({"bundle": str(demo_bundle), "replica_count": 2})
    with pytest.raises(UsageError, match="max replicas"):
        ray_app.app_builder({"bundle": str(demo_bundle), "replicas": 3, "max_replicas": 2})
