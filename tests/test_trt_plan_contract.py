"""Contract tests for TensorRT build plans, from TensorRT's own sources (the `trt_versions` tables).

For every registered TensorRT target, every JetPack (so TensorRT release) it runs, and FP16 and INT8:
every command line `build.sh` renders parses against that release's trtexec option table, static graphs
get no shapes, and every file a line reads exists in the bundle given to `build`. Negative tests show
the tables reject what those releases reject. The Python API attributes the build and runtime code use
exist in every release's bindings, or are guarded.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dream_export.calib.trt_cache import write_cache
from dream_export.errors import UsageError
from dream_export.io import file_digest
from dream_export.targets import trt_contract
from dream_export.targets.bundle_builds import bundle_builds
from dream_export.targets.plan_check import check_script, reference_graph, script_commands
from dream_export.targets.plan_files import bind_to_bundle
from dream_export.targets.registry import all_targets
from dream_export.targets.trtexec import (
    GraphBuild,
    make_build,
    trtexec_command,
    trtexec_profile_command,
    verify_step,
    write_build_bundle,
)

try:
    from tests.calib_fixture import calibrated
except ImportError:  # pragma: no cover
    from calib_fixture import calibrated

ROOT = Path(__file__).resolve().parents[1]


def _cases() -> list[tuple[str, str | None, str]]:
    """(target, jetpack, TensorRT major.minor) for every TensorRT target and JetPack it runs."""
    out = []
    for t in all_targets():
        if t.trt_version is None:
            continue
        for jp in t.jetpacks or (None,):
            tt = t.with_jetpack(jp) if jp else t
            out.append((t.name, jp, tt.tensorrt))
    return out


CASES = _cases()


# ------------------------------------------------------------------------------------ the tables


def test_tables_match_the_tensorrt_sources():
    mirror = os.environ.get("TENSORRT_SRC")
    if not mirror or not Path(mirror).exists():
        pytest.skip("set TENSORRT_SRC to a git clone (or bare mirror) of NVIDIA/TensorRT to regenerate the tables")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "trt_tables.py"), "--mirror", mirror, "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _rejects(argv: list[str], version: str) -> bool:
    return bool(trt_contract.check_trtexec_argv(["trtexec", "--onnx=a.onnx", *argv], version))


def test_tables_reject_what_each_release_rejects():
    for v in ("8.5", "8.6"):  # JetPack 5.1 / 6.0: one profile per build, none selectable at inference
        assert _rejects(["--profile=0"], v) and _rejects(["--useProfile=0"], v)
    assert _rejects(["--stronglyTyped"], "8.6") and not _rejects(["--stronglyTyped"], "9.0")
    assert not _rejects(["--profile=1", "--minShapes=x:1"], "9.0") and not _rejects(["--useProfile=1"], "10.3")
    assert _rejects(["--skipInference"], "8.5") and not _rejects(["--skipInference"], "8.6")
    assert not _rejects(["--buildOnly"], "8.6") and _rejects(["--buildOnly"], "10.0")
    assert _rejects(["--builderOptimizationLevel=3"], "8.5") and not _rejects(["--builderOptimizationLevel=3"], "8.6")
    assert _rejects(["--workspace=1024"], "10.0") and not _rejects(["--workspace=1024"], "8.6")
    assert _rejects(["--minShapes"], "10.3")  # a value-taking option without a value
    assert _rejects(["--fp16", "--fp16"], "10.3")  # the second copy is left over: "Unknown option"
    assert not _rejects(["--noSuchOption"][:0], "10.3") and _rejects(["--noSuchOption"], "10.3")
    for v in trt_contract.table_versions():  # quoted from sampleEngines.cpp of every release
        assert "Static model does not take explicit shapes" in trt_contract.static_model_refuses_shapes(v)
    assert "kINT64" not in trt_contract.data_types("8.6") and "kINT64" in trt_contract.data_types("9.0")
    assert trt_contract.table_version("10.4") == "10.3" and trt_contract.table_version("10.13") == "10.13"
    with pytest.raises(UsageError, match="not covered"):
        trt_contract.table_version("7.2")


def test_commands_follow_each_release():
    profiles = [{"x": ((1, 1), (1, 4), (1, 8))}, {"x": ((1, 1), (1, 2), (1, 2))}]
    b85 = make_build("target", "fp16", "jetson-agx-xavier", profiles)  # JetPack 5.1: TensorRT 8.5
    assert len(b85.profiles) == 1 and "--buildOnly" in trtexec_command(b85)
    timing = trtexec_profile_command(b85, {"x": (1, 4)})
    assert not any(a.startswith(("--useProfile", "--profile")) for a in timing)
    with pytest.raises(UsageError, match="no --useProfile"):
        trtexec_profile_command(b85, {"x": (1, 4)}, profile_index=1)
    b103 = make_build("target", "fp16", "jetson-orin-nano-8gb", profiles)
    argv = trtexec_command(b103)
    assert [a for a in argv if a.startswith("--profile")] == ["--profile=0", "--profile=1"]
    assert "--useProfile=1" in trtexec_profile_command(b103, {"x": (1, 2)}, profile_index=1)
    with pytest.raises(UsageError, match="TensorRT 9"):  # a hand-made Q/DQ build for 8.6
        trtexec_command(GraphBuild("target", "a.onnx", "a.engine", profiles[:1], strongly_typed=True, tensorrt="8.6"))


# ------------------------------------------------------------------------------------ rendered plans


@pytest.fixture(scope="module")
def fp16_bundle(demo_bundle, tmp_path_factory):
    """The demo bundle with the verification feeds `build` records (`<bundle>/verify/`)."""
    from dream_export.targets.coverage import save_verify_feeds

    b = tmp_path_factory.mktemp("plans") / "bundle"
    shutil.copytree(demo_bundle, b)
    save_verify_feeds(b, b / "verify")
    return b


@pytest.fixture(scope="module")
def int8_bundles(demo_bundle, fp16_bundle, tmp_path_factory):
    """TensorRT version -> an INT8 bundle as `calibrate` writes it (target and draft calibrated), its cache
    written by the project's cache writer for that version; the feeds copied (same graph inputs)."""
    src = calibrated(demo_bundle, tmp_path_factory.mktemp("calib"))
    out = {}
    for version in {v for _, _, v in CASES}:
        b = tmp_path_factory.mktemp(f"int8-{version}") / "bundle"
        shutil.copytree(src, b)
        shutil.copytree(fp16_bundle / "verify", b / "verify")
        full = {"8.5": "8.5.2", "8.6": "8.6.2"}.get(version, f"{version}.0")
        m = json.loads((b / "manifest.json").read_text())
        for comp in ("target", "draft"):
            cache = b / f"calib/{comp}.cache"
            write_cache(cache, json.loads((b / f"calib/{comp}.amax.json").read_text()), full)
            # as `calibrate --trt-version` records it: the bundle's integrity record covers the cache
            m["files"][f"calib/{comp}.cache"] = {"bytes": cache.stat().st_size, "sha256": file_digest(cache)}
        (b / "manifest.json").write_text(json.dumps(m, indent=2))
        out[version] = b
    return out


def _render(bundle: Path, target: str, jetpack: str | None, precision: str, out: Path) -> tuple[str, list]:
    from dream_export.runtime.bundle import Bundle
    from dream_export.targets.registry import get_target

    tgt = get_target(target, jetpack)
    manifest = Bundle.open(bundle).manifest
    builds, _ = bind_to_bundle(bundle_builds(manifest, tgt, precision), manifest, bundle, precision)
    verify = {b.component: [verify_step(b, f"verify/{b.component}.json", reference_graph(manifest, b.component),
                                        i if len(b.profiles) > 1 else None) for i in range(len(b.profiles))]
              for b in builds}
    _, sh = write_build_bundle(out, builds, tgt, root=os.path.relpath(bundle, out), verify=verify)
    return sh.read_text(), builds


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_every_rendered_line_parses_and_names_existing_files(fp16_bundle, int8_bundles, tmp_path, precision):
    checked = 0
    for target, jetpack, version in CASES:
        bundle = fp16_bundle if precision == "fp16" else int8_bundles[version]
        text, builds = _render(bundle, target, jetpack, precision, tmp_path / f"{target}-{jetpack}-{precision}")
        assert trt_contract.table_version(version) in trt_contract.table_versions()
        for _kind, comp, argv in script_commands(text):
            if argv[0] == "trtexec":
                assert trt_contract.check_trtexec_argv(argv, version) == [], (target, jetpack, argv)
                checked += 1
            static = next(b for b in builds if b.component == comp.split(".")[0]).static
            if static:  # the vision graph: no shape flag in its build or timing line
                assert not any(a.startswith(("--minShapes", "--optShapes", "--maxShapes", "--shapes")) for a in argv)
        result = check_script(bundle, text)
        assert (result["unknown_options"], result["missing_files"]) == (0, 0), (target, jetpack, result)
        assert [b.static for b in builds] == [True, False, False]
        if precision == "int8":
            modes = {b.component: (b.strongly_typed, b.int8, b.fp16) for b in builds}
            quantized = (True, False, False) if trt_contract.has_option(version, "--stronglyTyped") else (False, True, True)
            assert modes == {"vision": (False, False, True), "target": quantized, "draft": quantized}
    assert checked >= 2 * len(CASES) * 3


def test_int8_plans_refuse_bundles_without_the_files(fp16_bundle, int8_bundles, tmp_path):
    with pytest.raises(UsageError, match="dream-export calibrate .* --precision int8"):
        _render(fp16_bundle, "jetson-orin-nano-8gb", None, "int8", tmp_path / "a")
    with pytest.raises(UsageError, match="written for TensorRT 8.5.*--trt-version 8.6.2"):
        _render(int8_bundles["8.5"], "jetson-orin-nano-8gb", "6.0", "int8", tmp_path / "b")


def test_rendered_reference_command_runs_with_onnx_runtime_here(fp16_bundle, tmp_path):
    text, _ = _render(fp16_bundle, "jetson-orin-nano-8gb", "6.2", "fp16", fp16_bundle / "engines" / "x")
    refs = [argv for kind, _, argv in script_commands(text) if kind == "reference"]
    assert {argv[2] for argv in refs} == {"onnx/vision.onnx", "onnx/target.onnx", "onnx/draft.onnx"}
    polygraphy = shutil.which("polygraphy") or str(Path(sys.executable).with_name("polygraphy"))
    from polygraphy.json import load_json

    for argv in refs:
        r = subprocess.run([polygraphy, *argv[1:]], cwd=fp16_bundle, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, shlex.join(argv) + "\n" + r.stdout[-2000:] + r.stderr[-2000:]
        saved = load_json(fp16_bundle / argv[argv.index("--save-outputs") + 1])
        assert len(saved) == 1 and len(saved[0][1]) == len(load_json(fp16_bundle / argv[argv.index("--load-inputs") + 1]))


# ------------------------------------------------------------------------------------ the Python API

# Receiver variable -> TensorRT class, as the build and runtime code name them.
RECEIVERS = {"config": "IBuilderConfig", "builder": "Builder", "network": "INetworkDefinition",
             "parser": "OnnxParser", "prof": "IOptimizationProfile", "engine": "ICudaEngine",
             "ctx": "IExecutionContext", "context": "IExecutionContext", "inspector": "EngineInspector"}
API_FILES = ("dream_export/targets/trt_build.py", "dream_export/runtime/trt_backend.py")


def _key(node: ast.AST) -> tuple[str | None, str] | None:
    """(class or None for the module, attribute) of `trt.X`, `trt.Enum.Y` or `<receiver>.X`."""
    if not isinstance(node, ast.Attribute) or node.attr.startswith("__"):
        return None
    v = node.value
    if isinstance(v, ast.Name):
        return (None, node.attr) if v.id == "trt" else ((RECEIVERS[v.id], node.attr) if v.id in RECEIVERS else None)
    if isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name) and v.value.id == "trt":
        return v.attr, node.attr
    return None


def _hasattr_keys(test: ast.AST, negated: bool = False) -> set:
    """Keys a condition proves present: `hasattr(R, "a")` (inside `and`), or `not hasattr(...)` if negated."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return _hasattr_keys(test.operand, not negated)
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And) and not negated:
        return set().union(*(_hasattr_keys(v) for v in test.values))
    if (isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id == "hasattr" and negated is False
            and isinstance(test.args[1], ast.Constant)):
        key = _key(ast.Attribute(value=test.args[0], attr=test.args[1].value))
        return {key} if key else set()
    return set()


def api_uses(source: str) -> list[tuple[tuple[str | None, str], bool]]:
    """Every TensorRT attribute `source` reads, with whether a `hasattr` guard protects it. Guards: the
    body of `if hasattr(R, "a") [and ...]:`, and the statements after `if not hasattr(R, "a"): return/raise`
    in the same block."""
    out = []
    blocks = ("body", "orelse", "finalbody", "handlers")

    def visit_block(stmts: list, guarded: frozenset) -> None:
        for stmt in stmts:
            visit(stmt, guarded)
            if isinstance(stmt, ast.If) and not stmt.orelse and stmt.body and isinstance(
                    stmt.body[-1], (ast.Return, ast.Raise)):
                guarded = guarded | _hasattr_keys(stmt.test, negated=True)

    def visit(node: ast.AST, guarded: frozenset) -> None:
        key = _key(node)
        if key:
            out.append((key, key in guarded))
        if isinstance(node, ast.If):
            visit(node.test, guarded)
            visit_block(node.body, guarded | _hasattr_keys(node.test))
            visit_block(node.orelse, guarded)
            return
        for name, value in ast.iter_fields(node):
            if name in blocks and isinstance(value, list):
                visit_block(value, guarded)
            else:
                for child in value if isinstance(value, list) else [value]:
                    if isinstance(child, ast.AST):
                        visit(child, guarded)

    visit(ast.parse(source), frozenset())
    return out


def test_guards_are_recognized():
    src = """
if hasattr(config, "builder_optimization_level"):
    config.builder_optimization_level = 3
def f():
    if not hasattr(trt, "IProgressMonitor"):
        return None
    return trt.IProgressMonitor
config.progress_monitor = m
"""
    uses = dict(api_uses(src))
    assert uses[("IBuilderConfig", "builder_optimization_level")] is True
    assert uses[(None, "IProgressMonitor")] is True
    assert uses[("IBuilderConfig", "progress_monitor")] is False
    assert not trt_contract.api_has("8.5", "IBuilderConfig", "builder_optimization_level")
    assert trt_contract.api_has("8.6", "IBuilderConfig", "builder_optimization_level")


@pytest.mark.parametrize("path", API_FILES)
def test_every_tensorrt_attribute_exists_in_every_release_or_is_guarded(path):
    uses = api_uses((ROOT / path).read_text())
    assert len({k for k, _ in uses}) >= 10  # the collector sees the real code
    for version in trt_contract.table_versions():
        missing = sorted({k for k, guarded in uses if not guarded and not trt_contract.api_has(version, *k)}, key=str)
        assert missing == [], f"{path}: not in the TensorRT {version} bindings and unguarded: {missing}"


def test_strongly_typed_int8_graph_runs_fp16_outside_the_quantized_linears(int8_bundles, fp16_bundle):
    # TensorRT 9+ takes every type from a strongly typed graph: the Q/DQ twin `calibrate` writes for it
    # must hold the non-quantized MatMuls (attention products, LM head) in FP16, with FP16 Q/DQ scales
    import onnx
    from polygraphy.json import load_json

    from dream_export.export.fp16 import fp32_nodes
    from dream_export.export.parity import compare_graphs
    from dream_export.targets.registry import get_target

    bundle = int8_bundles["10.3"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    builds, _ = bind_to_bundle(bundle_builds(manifest, get_target("jetson-orin-nano-8gb"), "int8"), manifest, bundle,
                               "int8")
    target = next(b for b in builds if b.component == "target")
    assert target.strongly_typed and target.onnx == "onnx-int8/target.fp16.onnx"
    model = onnx.shape_inference.infer_shapes(onnx.load(str(bundle / target.onnx)))
    f16 = onnx.TensorProto.FLOAT16
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    types |= {i.name: i.data_type for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    kept = fp32_nodes(model)
    assert all(types[n.input[1]] == f16 for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    plain = [n for n in model.graph.node if n.op_type == "MatMul" and n.name not in kept
             and not any(getattr(producer.get(i), "op_type", "") == "DequantizeLinear" for i in n.input)]
    assert len(plain) >= 48  # attention products of every layer and the LM head
    assert all(types.get(i) == f16 for n in plain for i in n.input), [n.name for n in plain if types.get(n.input[0]) != f16]
    # and it computes what the fp32 Q/DQ graph computes within the project's FP16 parity tolerance, on feeds
    # the runtime recorded (prefill and verification)
    parity = compare_graphs(bundle / "onnx-int8/target.onnx", bundle / target.onnx,
                            load_json(fp16_bundle / "verify" / "target.json"), "fp16")
    assert parity["ok"], parity


def test_build_script_records_verification_results_as_json(tmp_path):
    # build.sh's own verify_engine / write_verify, run by bash with stand-in commands for the two
    # polygraphy runs (true: within tolerance, false: off): verify.json is valid JSON and a failure fails
    from dream_export.targets.trtexec import _SCRIPT_BODY

    functions = _SCRIPT_BODY[_SCRIPT_BODY.index("VERIFY_ROWS="):]
    engine = tmp_path / "engines" / "t"
    engine.mkdir(parents=True)
    script = ('die() { echo "$*" >&2; exit 1; }\nTARGET=t\nTRT_FOUND=10.3\n' + functions +
              f"verify_engine vision true ::: true run {engine}/vision.engine\n"
              f"verify_engine target.p1 true ::: false run {engine}/target.engine\n"
              f"write_verify {engine}/verify.json\n")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and "beyond tolerance" in r.stderr
    result = json.loads((engine / "verify.json").read_text())
    assert result["components"]["vision"]["ok"] is True and result["components"]["target.p1"]["ok"] is False
    assert result["components"]["target.p1"]["log"].endswith("target.p1.verify.log")
