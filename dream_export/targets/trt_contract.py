"""Questions asked of the per-release TensorRT tables (`trt_versions`): which release a version reads,
whether trtexec accepts a command line, whether a Python API attribute exists.

The tables are generated from TensorRT's sources by `tools/trt_tables.py`; this module only reads them,
so a build plan can be checked here, without TensorRT, against what the device's release accepts.
"""

from __future__ import annotations

import dream_export.targets.trt_versions as tables
from dream_export.errors import UsageError

# Options that trtexec reads as a group per optimization profile (9.0+: `getAndDelOptionBehind` after each
# --profile) or collects (`getAndDelRepeatedOption`): the only ones a command may repeat.
_REPEATABLE = frozenset({"--profile", "--minShapes", "--optShapes", "--maxShapes", "--plugins",
                         "--staticPlugins", "--dynamicPlugins", "--setPluginsToSerialize", "--output"})


def table_versions() -> tuple[str, ...]:
    """The releases the tables were read from, oldest first ("8.5", ..., "10.13")."""
    return tuple(sorted(tables.REFS, key=_key))


def _key(version: str) -> tuple[int, int]:
    major, minor = (str(version).split(".") + ["0"])[:2]
    return int(major), int(minor)


def table_version(version: str) -> str:
    """The table release that stands for TensorRT `version`: the same major.minor, or the newest older
    minor of the same major (10.4 reads the 10.3 tables: options are added, not removed, within 10.x).
    Raises `UsageError` for a major the tables do not cover."""
    want = _key(version)
    candidates = [v for v in table_versions() if _key(v)[0] == want[0] and _key(v) <= want]
    if not candidates:
        raise UsageError(f"TensorRT {version} is not covered by the version tables "
                         f"(known: {', '.join(table_versions())})")
    return candidates[-1]


def source_of(table: str, version: str) -> str:
    """'<file> at <ref>' for a table and release, for messages that cite the source."""
    v = table_version(version)
    return f"{tables.SOURCES[table]} at {tables.REFS[v]}"


def trtexec_options(version: str) -> dict[str, bool | None]:
    """trtexec's options in `version`: name -> whether it takes a value."""
    return tables.TRTEXEC_OPTIONS[table_version(version)]


def has_option(version: str, option: str) -> bool:
    """Whether trtexec of `version` parses `option` ("--useProfile")."""
    return option in trtexec_options(version)


def check_trtexec_argv(argv: list[str], version: str) -> list[str]:
    """Every reason trtexec `version` would reject `argv` (empty: it parses). Mirrors `argsToArgumentsMap`:
    each argument is `--name` or `--name=value`; a name left over after parsing is an "Unknown option";
    a value-taking option without a value fails its conversion (`std::stoi("")`); a flag given twice
    leaves one copy over. A flag given a value (`--fp16=0`) parses, as `stringToValue<bool>` returns true
    whatever the text, so it is not reported."""
    options = trtexec_options(version)
    problems: list[str] = []
    seen: set[str] = set()
    for arg in argv[1:] if argv and not argv[0].startswith("-") else argv:
        name, _, value = arg.partition("=")
        if name not in options:
            problems.append(f"unknown option {name} (trtexec {version}, {source_of('trtexec_options', version)})")
            continue
        if options[name] and not value:
            problems.append(f"{name} needs a value")
        if name in seen and name not in _REPEATABLE:
            problems.append(f"{name} given twice (trtexec keeps one and reports the other as unknown)")
        seen.add(name)
    return problems


def count_unknown_options(argv: list[str], version: str) -> int:
    """Arguments of `argv` that trtexec `version` does not know."""
    options = trtexec_options(version)
    return sum(arg.partition("=")[0] not in options for arg in argv if arg.startswith("-"))


def static_model_refuses_shapes(version: str) -> str | None:
    """The message trtexec `version` stops with when a static model gets explicit shapes (None if it does not)."""
    fact = tables.STATIC_MODEL_SHAPES[table_version(version)]
    return f"{fact['message']} ({fact['file']}:{fact['line']} at {tables.REFS[table_version(version)]})" if fact else None


def api_members(version: str, cls: str) -> set[str]:
    """Members of the Python class `cls` in `version`'s bindings, inherited ones included."""
    classes = tables.PYTHON_API[table_version(version)]["classes"]
    out: set[str] = set()
    todo = [cls]
    while todo:
        c = todo.pop()
        if c in classes:
            out |= set(classes[c]["members"])
            todo += classes[c]["bases"]
    return out


def api_has(version: str, cls: str | None, attr: str) -> bool:
    """Whether `tensorrt.<attr>` (cls None) or `<cls instance>.<attr>` exists in `version`'s bindings."""
    api = tables.PYTHON_API[table_version(version)]
    if cls is None:
        return attr in api["module"]
    return attr in api_members(version, cls)


def data_types(version: str) -> tuple[str, ...]:
    """TensorRT `DataType` members of `version` ("kFLOAT", "kHALF", ..., "kINT64" from 9.0)."""
    return tuple(tables.DATA_TYPES[table_version(version)]["types"])


def nptype_numpy_names(version: str) -> dict[str, str]:
    """`tensorrt.nptype`'s mapping in `version`: TensorRT dtype name -> numpy attribute it names."""
    return dict(tables.PYTHON_API[table_version(version)]["nptype"])
