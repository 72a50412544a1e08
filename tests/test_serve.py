"""`dream-export serve` through the official openai client, on loopback: answers equal `dream-export run`'s,
streams, concurrency, bad and over-capacity requests."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai", reason="the serve extra is not installed")

from click.testing import CliRunner  # noqa: E402

from dream_export.cli import cli  # noqa: E402
from dream_export.demo import scenes  # noqa: E402
from dream_export.serve.app import ServeConfig, Service, create_app  # noqa: E402
from dream_export.serve.local import BackgroundServer  # noqa: E402
from dream_export.serve.protocol import data_url  # noqa: E402

MAX_TOKENS = 48


def _sample(k: int):
    scene, s = scenes.make_sample(scenes.HELDOUT_SEED_BASE + 100 + k, scenes.TASKS[k % len(scenes.TASKS)])
    return scenes.render(scene), s.prompt


def _messages(img, prompt: str, url: str | None = None) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url or data_url(img)}},
                                         {"type": "text", "text": prompt}]}]


@pytest.fixture(scope="module")
def service(demo_bundle):
    return Service.load(ServeConfig(demo_bundle))


@pytest.fixture(scope="module")
def server(service):
    with BackgroundServer(create_app(service)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(client, model: str, img, prompt: str, **kw):
    return client.chat.completions.create(model=model, messages=_messages(img, prompt), max_tokens=MAX_TOKENS,
                                          temperature=0.0, **kw)


def _streamed(client, model: str, img, prompt: str) -> tuple[str, list]:
    chunks = list(_ask(client, model, img, prompt, stream=True))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_models_and_health(client, server, service):
    assert [m.id for m in client.models.list().data] == [service.name]
    health = client.get(server + "/health", cast_to=object)
    assert health["status"] == "ok" and health["model"] == service.name


def test_greedy_answer_equals_dream_export_run(client, service, demo_bundle, tmp_path):
    img, prompt = _sample(0)
    img.save(tmp_path / "img.png")
    out = CliRunner().invoke(cli, ["run", str(demo_bundle), "--image", str(tmp_path / "img.png"), "--prompt", prompt,
                                   "--max-new-tokens", str(MAX_TOKENS), "--json"])
    assert out.exit_code == 0, out.output
    ran = json.loads(out.output.strip().splitlines()[-1])
    res = _ask(client, service.name, img, prompt)
    assert res.choices[0].message.content == ran["text"]
    assert res.choices[0].finish_reason == {"stop": "stop", "length": "length"}[ran["finish_reason"]]
    assert res.usage.completion_tokens == len(ran["tokens"])
    assert res.usage.prompt_tokens == ran["stats"]["prompt_tokens"]
    spec = res.model_extra["speculation"]
    assert spec["tau"] > 1 and spec["tokens_per_s"] > 0


def test_streamed_deltas_join_to_the_answer(client, service):
    img, prompt = _sample(1)
    text, chunks = _streamed(client, service.name, img, prompt)
    want = _ask(client, service.name, img, prompt)
    assert len(chunks) > 3 and text == want.choices[0].message.content
    last = chunks[-1]
    assert last.choices[0].finish_reason == want.choices[0].finish_reason
    assert last.usage.completion_tokens == want.usage.completion_tokens
    assert last.model_extra["speculation"]["tau"] == pytest.approx(want.model_extra["speculation"]["tau"])


def test_eight_concurrent_clients_get_their_sequential_answers(client, service):
    samples = [_sample(k) for k in range(8)]
    sequential = [_ask(client, service.name, img, p).choices[0].message.content for img, p in samples]

    def one(k: int) -> str:  # half the clients stream
        img, p = samples[k]
        return _streamed(client, service.name, img, p)[0] if k % 2 else \
            _ask(client, service.name, img, p).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == sequential


def _bad(client, service, match: str, code: str | None = None, **request):
    request.setdefault("model", service.name)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**request)
    err = e.value.body
    assert e.value.status_code == 400 and match in err["message"] and err["type"] == "invalid_request_error"
    if code:
        assert err["code"] == code


def test_bad_requests_get_400_and_the_server_keeps_serving(client, service, server):
    img, prompt = _sample(2)
    want = _ask(client, service.name, img, prompt).choices[0].message.content
    _bad(client, service, "messages", messages=[])
    _bad(client, service, "messages.0.role", messages=[{"role": "robot", "content": "hi"}])
    _bad(client, service, "does not fetch remote images", messages=_messages(img, prompt, "https://example.com/a.png"))
    _bad(client, service, "not valid base64", messages=_messages(img, prompt, "data:image/png;base64,@@@"))
    _bad(client, service, "not a readable image",
         messages=_messages(img, prompt, "data:image/png;base64," + base64.b64encode(b"not a png").decode()))
    _bad(client, service, "local image files are off", messages=_messages(img, prompt, "file:///etc/hostname"))
    _bad(client, service, "last message", messages=[*_messages(img, prompt), {"role": "assistant", "content": "x"}])
    _bad(client, service, "temperature", messages=_messages(img, prompt), temperature=-1)
    _bad(client, service, "stop", messages=_messages(img, prompt), stop=["a", "b", "c", "d", "e"])
    # the openai client only sends JSON: a broken body goes through urllib
    req = urllib.request.Request(server + "/v1/chat/completions", data=b"{not json",
                                 headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="another-model", messages=_messages(img, prompt))
    assert _ask(client, service.name, img, prompt).choices[0].message.content == want


def test_over_capacity_gets_400_streamed_or_not(client, service):
    img, prompt = _sample(3)
    long = _messages(img, "tell me " * 300)
    _bad(client, service, "KV capacity", "context_length_exceeded", messages=long)
    _bad(client, service, "KV capacity", "context_length_exceeded", messages=long, stream=True)
    _bad(client, service, "max_tokens asks for", "context_length_exceeded", messages=_messages(img, prompt),
         max_tokens=service.pipe.kv_capacity)
    assert _ask(client, service.name, img, prompt).choices[0].finish_reason in ("stop", "length")


def _settled_health(client, server) -> dict:
    for _ in range(1200):  # bounded: the worker notices a departed client after its current round
        health = client.get(server + "/health", cast_to=object)
        if health["active"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"requests still active: {health}")


def test_an_abandoned_stream_stops_and_frees_the_server(client, service, server):
    img, prompt = _sample(4)
    hot = dict(model=service.name, messages=_messages(img, prompt), temperature=2.0, max_tokens=200)
    before = _settled_health(client, server)["abandoned"]
    stream = client.chat.completions.create(stream=True, **hot)
    next(iter(stream))
    stream.close()
    assert _settled_health(client, server)["abandoned"] == before + 1
    # a client that gives up while its stream still waits behind others: skipped (or stopped, if it had
    # already started when the client left)
    with ThreadPoolExecutor(3) as pool:
        busy = [pool.submit(client.chat.completions.create, **{**hot, "seed": k}) for k in range(3)]
        time.sleep(0.2)
        try:
            client.with_options(timeout=0.3).chat.completions.create(stream=True, **hot).close()
        except openai.APITimeoutError:
            pass
        assert all(f.result().choices[0].message.content for f in busy)
    assert _settled_health(client, server)["abandoned"] == before + 2
    assert _ask(client, service.name, img, prompt).choices[0].message.content


def test_local_image_files_only_when_allowed(service, tmp_path):
    img, prompt = _sample(5)
    img.save(tmp_path / "img.png")
    allowed = Service(service.pipe, ServeConfig(service.config.bundle, local_images=tmp_path))
    with BackgroundServer(create_app(allowed)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        got = c.chat.completions.create(model=allowed.name, messages=_messages(img, prompt, f"file://{tmp_path}/img.png"),
                                        max_tokens=MAX_TOKENS, temperature=0.0)
        assert got.choices[0].message.content == _ask(c, allowed.name, img, prompt).choices[0].message.content
        _bad(c, allowed, "outside the allowed directory", messages=_messages(img, prompt, "file:///etc/hostname"))


def test_bench_serve_reports_each_concurrency_level(server, tmp_path):
    rows = []
    for k in range(2):
        img, prompt = _sample(k)
        img.save(tmp_path / f"{k}.png")
        rows.append(json.dumps({"image": f"{k}.png", "prompt": prompt}))
    (tmp_path / "d.jsonl").write_text("\n".join(rows))
    out = CliRunner().invoke(cli, ["bench-serve", server, "--data", str(tmp_path / "d.jsonl"), "-c", "1", "-c", "2",
                                   "--requests", "4", "--max-tokens", "16", "--json", str(tmp_path / "b.json"),
                                   "--plot", str(tmp_path / "b.png")])
    assert out.exit_code == 0, out.output
    levels = json.loads((tmp_path / "b.json").read_text())["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2] and all(lv["requests"] == 4 for lv in levels)
    for lv in levels:
        assert 0 < lv["ttft_p50"] <= lv["latency_p50"] <= lv["latency_p95"] and lv["requests_per_s"] > 0
        assert lv["completion_tokens"] == sum(s["tokens"] for s in lv["samples"]) > 0
    assert (tmp_path / "b.png").stat().st_size > 0


def test_serve_command_starts_and_stops_on_sigterm(demo_bundle):
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "dream_export.cli", "serve", str(demo_bundle), "--port", str(port),
                             "--model-name", "demo"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        for _ in range(600):  # bounded wait for start-up (loading the bundle)
            try:
                assert [m.id for m in c.models.list().data] == ["demo"]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.1)
        else:
            raise AssertionError("the server did not start")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    # a graceful shutdown (uvicorn then re-raises the signal, so the exit status may be -SIGTERM)
    assert "Finished server process" in proc.stdout.read().decode()
