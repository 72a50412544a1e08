#!/usr/bin/env python3
"""Regenerate `dream_export/targets/trt_versions.py` from TensorRT's own sources.

    python tools/trt_tables.py --mirror /path/to/NVIDIA/TensorRT/.git [--out dream_export/targets/trt_versions.py]

`--mirror` is a git directory (bare or not) of https://github.com/NVIDIA/TensorRT; files are read at each
release's ref with `git show REF:PATH`, so no work tree is needed. What is read, per release:

- trtexec's options: every `"--name"` literal passed to trtexec's argument parsers in
  `samples/common/sampleOptions.cpp` (the `*::parse(Arguments&)` functions that `AllOptions::parse`
  calls, the shape/profile helpers, not the safety builder's own parser). trtexec rejects any argument
  left over after parsing ("Unknown option", `samples/trtexec/trtexec.cpp`). An option takes a value
  unless it is read into a `bool` (`getAndDelOption(arguments, "--fp16", fp16)` with `bool fp16`) or
  through `getAndDelNegOption`.
- whether a static model refuses explicit shapes (`samples/common/sampleEngines.cpp`, the message quoted).
- the Python API: classes, enums and their members from the pybind11 bindings `python/src/infer/*.cpp`
  and `python/src/parsers/pyOnnx.cpp` (`py::class_<...>(m, "Name")`, `.def("attr"`, `.def_property("attr"`,
  `.value("NAME"`), with C++ base classes so inherited members resolve.
- the I/O data types: `enum class DataType` of the runtime headers (`include/NvInferRuntime*.h`).

The output is data only; `tests/test_trt_tables.py` checks the committed module equals this script's output
when a mirror is at hand.
"""

from __future__ import annotations

import argparse
import pprint
import re
import subprocess
import sys
from pathlib import Path

# TensorRT major.minor -> git ref read. 8.5 and 8.6 are JetPack 5.1 and 6.0; 10.3 is JetPack 6.1/6.2;
# 10.13 is JetPack 7 (Thor); 9.0 and 10.0 are the first releases with strongly typed networks / the 10 API.
REFS: dict[str, str] = {
    "8.5": "8.5.2",
    "8.6": "release/8.6",
    "9.0": "release/9.0",
    "10.0": "release/10.0",
    "10.3": "release/10.3",
    "10.13": "release/10.13",
}

OPTIONS_FILE = "samples/common/sampleOptions.cpp"
OPTIONS_HEADER = "samples/common/sampleOptions.h"
ENGINES_FILE = "samples/common/sampleEngines.cpp"
# The pure-Python part of the package (nptype, volume, ...): 8.5 keeps it in packaging/tensorrt/.
PACKAGE_INITS = ("python/packaging/bindings_wheel/tensorrt/__init__.py", "python/packaging/tensorrt/__init__.py")
BINDING_FILES = ("python/src/infer/pyCore.cpp", "python/src/infer/pyGraph.cpp",
                 "python/src/infer/pyFoundationalTypes.cpp", "python/src/infer/pyInt8.cpp",
                 "python/src/parsers/pyOnnx.cpp")
DTYPE_HEADERS = ("include/NvInferRuntimeBase.h", "include/NvInferRuntimeCommon.h", "include/NvInferRuntime.h")

# Parsers trtexec does not run (the safety-certified builder's own command line).
_FOREIGN_PARSERS = ("SafeBuilderOptions", "TaskInferenceOptions")


def git_show(mirror: str, ref: str, path: str) -> str | None:
    """`git show REF:PATH` of the mirror, or None when the file is not in that release."""
    out = subprocess.run(["git", "-C", mirror, "show", f"{ref}:{path}"], capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else None


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def _function_bodies(src: str) -> list[tuple[str, str]]:
    """(signature line, body) of each top-level function (a line starting at column 0, body to '^}')."""
    out = []
    for m in re.finditer(r"^(?=[A-Za-z])([^\n;]*\([^;{]*\)\s*(?:const\s*)?)\n\{\n(.*?)^\}", src, re.S | re.M):
        out.append((m.group(1), m.group(2)))
    return out


def trtexec_options(options_cpp: str, options_h: str) -> dict[str, bool]:
    """{option: takes a value} of trtexec's parser in one release's sampleOptions.cpp."""
    src = _strip_comments(options_cpp)
    bools = set(re.findall(r"\bbool\s+(\w+)\s*[{=;]", src + _strip_comments(options_h)))
    bools |= set(re.findall(r"\bbool\s+(\w+)\s*\{", src))
    options: dict[str, bool] = {}
    for signature, body in _function_bodies(src):
        if "Arguments&" not in signature or any(f"{p}::" in signature for p in _FOREIGN_PARSERS):
            continue
        for m in re.finditer(r'(\w+)\s*\(([^;()"]*?)"(--[A-Za-z][A-Za-z0-9]*)"\s*(,\s*([\w.]+)\s*)?', body):
            func, name, var = m.group(1), m.group(3), m.group(5)
            if func in ("invalid_argument", "runtime_error"):
                continue
            if func == "getAndDelNegOption":
                takes = False
            elif func in ("getAndDelOption", "getOption", "checkEraseOption") and var is not None:
                takes = var.split(".")[-1] not in bools
            else:  # shapes, formats, layer precisions, profiles, repeated options: all take a value
                takes = True
            options[name] = options.get(name, False) or takes
    return dict(sorted(options.items()))


def static_shapes_message(engines_cpp: str) -> dict | None:
    """Where sampleEngines.cpp refuses explicit shapes for a static model, with its message."""
    for i, line in enumerate(engines_cpp.splitlines(), 1):
        if "Static model does not take explicit shapes" in line:
            rest = engines_cpp.splitlines()[i - 1:i + 2]
            text = "".join(re.findall(r'"([^"]*)"', " ".join(rest)))
            return {"file": ENGINES_FILE, "line": i, "message": text.strip()}
    return None


_CLASS_RE = re.compile(r'py::(class_|enum_)<([^;{}()]*?)>\s*(\w+)?\s*[({]\s*(\w+)\s*,\s*"(\w+)"', re.S)
_MEMBER_RE = re.compile(r'\.(def|def_property|def_property_readonly|def_readwrite|def_readonly|def_static|value)'
                        r'\(\s*"(\w+)"')


def _split_template(args: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in args:
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()] if cur.strip() else parts


def python_api(sources: list[str]) -> dict:
    """{"module": names at `tensorrt.*`, "classes": {python name: {"bases": [...], "members": [...]}}}."""
    classes: dict[str, dict] = {}
    cpp_to_py: dict[str, str] = {}
    module: set[str] = set()
    pending_bases: dict[str, list[str]] = {}
    for raw in sources:
        src = _strip_comments(raw)
        decls = list(_CLASS_RE.finditer(src))
        var_to_py = {}
        for i, m in enumerate(decls):
            kind, targs, var, scope, py_name = m.groups()
            args = _split_template(targs)
            cpp = args[0]
            end = decls[i + 1].start() if i + 1 < len(decls) else len(src)
            chunk = src[m.end():end]
            # everything chained or def'd up to the next binding, except module functions (`m.def("x")`)
            members = set(_MEMBER_RE.findall(re.sub(r"\bm\s*\.\s*def\(", "m_def(", chunk)))
            entry = classes.setdefault(py_name, {"bases": [], "members": set()})
            entry["members"] |= {name for _, name in members}
            cpp_to_py.setdefault(cpp, py_name)
            cpp_to_py.setdefault(cpp.split("::")[-1], py_name)
            pending_bases[py_name] = args[1:]
            if var:
                var_to_py[var] = py_name
            if scope == "m":
                module.add(py_name)
            else:  # nested: ILogger.Severity; export_values() puts the members on the parent too
                parent = var_to_py.get(scope)
                if parent:
                    classes[parent]["members"].add(py_name)
                    if "export_values" in chunk.split(";")[0]:
                        classes[parent]["members"] |= {name for _, name in members}
        for var, py_name in var_to_py.items():
            for stmt in re.findall(rf"\b{var}\s*\.\s*def[^;]*;", src):
                classes[py_name]["members"] |= {name for _, name in _MEMBER_RE.findall("." + stmt.split(".", 1)[1])}
        module |= set(re.findall(r'\bm\s*\.\s*def\(\s*"(\w+)"', src))
    for py_name, bases in pending_bases.items():
        classes[py_name]["bases"] = sorted({cpp_to_py[b] for b in bases if b in cpp_to_py and cpp_to_py[b] != py_name})
    return {"module": sorted(module),
            "classes": {k: {"bases": v["bases"], "members": sorted(v["members"])} for k, v in sorted(classes.items())}}


def package_init(init_py: str) -> dict:
    """Module-level functions of the package's `__init__.py`, and nptype's TensorRT -> numpy mapping
    (names as written there: 8.5 maps `bool` to `np.bool`, which numpy 1.24 removed)."""
    body = init_py.split("def nptype", 1)[1].split("\ndef ", 1)[0] if "def nptype" in init_py else ""
    return {"functions": sorted(set(re.findall(r"^def ([A-Za-z]\w*)\(", init_py, re.M))),
            "nptype": dict(re.findall(r"^\s*(\w+):\s*np\.(\w+),", body, re.M))}


def data_types(headers: dict[str, str]) -> dict | None:
    """The members of `enum class DataType` and the header that declares it."""
    for path, text in headers.items():
        m = re.search(r"enum class DataType\s*:\s*\w+\s*\{(.*?)\};", _strip_comments(text), re.S)
        if m:
            return {"file": path, "types": re.findall(r"\b(k[A-Z0-9_]+)\s*=", m.group(1))}
    return None


def derive(mirror: str) -> dict:
    """Every table, per release."""
    tables: dict = {"refs": dict(REFS), "trtexec_options": {}, "static_model_shapes": {}, "python_api": {},
                    "data_types": {}}
    for version, ref in REFS.items():
        cpp, h = git_show(mirror, ref, OPTIONS_FILE), git_show(mirror, ref, OPTIONS_HEADER)
        if cpp is None:
            raise SystemExit(f"{OPTIONS_FILE} not found at {ref} in {mirror}")
        tables["trtexec_options"][version] = trtexec_options(cpp, h or "")
        tables["static_model_shapes"][version] = static_shapes_message(git_show(mirror, ref, ENGINES_FILE) or "")
        api = python_api([s for f in BINDING_FILES if (s := git_show(mirror, ref, f))])
        init = next((s for f in PACKAGE_INITS if (s := git_show(mirror, ref, f))), "")
        pkg = package_init(init)
        api["module"] = sorted(set(api["module"]) | set(pkg["functions"]))
        api["nptype"] = pkg["nptype"]
        tables["python_api"][version] = api
        headers = {f: s for f in DTYPE_HEADERS if (s := git_show(mirror, ref, f))}
        tables["data_types"][version] = data_types(headers)
    return tables


HEADER = '''"""TensorRT facts per release, read from TensorRT's own sources (generated: do not edit).

Regenerate with `python tools/trt_tables.py --mirror <git dir of NVIDIA/TensorRT>`; the test suite checks
this file against the script when a mirror is present. Each table is keyed by TensorRT "major.minor";
`REFS` names the git ref each release was read at, `SOURCES` the file each table comes from.
Interpretation (which release a version uses, what counts as a guard) lives in `trt_contract.py`.
"""

# flake8: noqa
# fmt: off
'''


def render(tables: dict) -> str:
    """The Python source of trt_versions.py."""
    sources = {"trtexec_options": OPTIONS_FILE, "static_model_shapes": ENGINES_FILE,
               "python_api": ", ".join(BINDING_FILES + PACKAGE_INITS), "data_types": " or ".join(DTYPE_HEADERS)}
    parts = [HEADER]
    parts.append(f"REFS = {pprint.pformat(tables['refs'], width=110, sort_dicts=False)}\n")
    parts.append(f"SOURCES = {pprint.pformat(sources, width=110, sort_dicts=False)}\n")
    parts.append("# option -> takes a value (trtexec: samples/common/sampleOptions.cpp, per REFS)")
    parts.append(f"TRTEXEC_OPTIONS = {pprint.pformat(tables['trtexec_options'], width=110, compact=True)}\n")
    parts.append("# where a static model refuses --minShapes/--optShapes/--maxShapes (samples/common/sampleEngines.cpp)")
    parts.append(f"STATIC_MODEL_SHAPES = {pprint.pformat(tables['static_model_shapes'], width=110)}\n")
    parts.append("# tensorrt module names and class members (python/src bindings, per REFS)")
    parts.append(f"PYTHON_API = {pprint.pformat(tables['python_api'], width=110, compact=True)}\n")
    parts.append("# enum class DataType members (include/NvInferRuntime*.h, per REFS)")
    parts.append(f"DATA_TYPES = {pprint.pformat(tables['data_types'], width=110, compact=True)}\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mirror", required=True, help="git directory of NVIDIA/TensorRT")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "dream_export/targets/trt_versions.py"))
    ap.add_argument("--check", action="store_true", help="exit 1 when --out differs from what the sources give")
    args = ap.parse_args(argv)
    text = render(derive(args.mirror))
    out = Path(args.out)
    if args.check:
        same = out.exists() and out.read_text() == text
        print(f"{out}: {'up to date' if same else 'differs from the sources; regenerate it'}")
        return 0 if same else 1
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
