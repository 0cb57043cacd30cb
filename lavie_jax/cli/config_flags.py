"""Stage configs from the command line: `--config NAME[:variant]` or `--config FILE[:variant]`, plus
`--config.a.b=value` overrides.

The command-line tools (`lavie-sample`, `lavie-train`) share this one loader so every tool reports a bad config
the same way: one `ConfigArgError` whose message names the flag, what is wrong and the fix, instead of a traceback.
Public API:

    config = load_config("base:tiny", [("sample.steps", "3")])      # a packaged config by name, overrides, locked
    config = load_config("my_configs/base.py:tiny")                  # a config file of your own, by path
    config_names()                                                   # ('base', 'demo', 'interpolation', 'vsr')
    configs, rest = parse_config_flags(sys.argv, ("config", "interpolation", "vsr"))   # what the CLIs call

A config is a Python module with `get_config(arg=None)`, or a `lavie-train` work directory: the config its run
stored (`--config RUN`; `lavie-sample --checkpoint RUN` without `--config` takes it so). the text after the first ':' is passed as `arg` (the
variant: 'tiny', 'demo'; none = the official size). The part before it is a config file when such a file exists,
else the name of a packaged config: `configs/NAME.py` of the checkout, installed as `lavie_jax.configs.NAME`
(`config_names()`; imported as that module). A file is run as a fresh module without touching `sys.path`: a copy of
a packaged config imports the shared pieces as `from lavie_jax.configs import common`. Override values are parsed
by the type of the field they replace (int, float, bool, str, tuple, list, None), so `--config.sample.steps=abc` is
refused before anything runs; unknown fields get a did-you-mean from the config's own keys. Override forms (as
`ml_collections.config_flags` accepts): `--config.a.b=VALUE`, `--config.a.b VALUE`, `--config.flag` /
`--noconfig.flag` for booleans, and a tuple field given several times (`--config.mesh.shape=2
--config.mesh.shape=4 ...`) collects the values.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.machinery
import importlib.resources
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections

_TRUE = ("true", "t", "yes", "y", "1")
_FALSE = ("false", "f", "no", "n", "0")
_NONE = ("none", "null")
PACKAGE = "lavie_jax.configs"  # the packaged configs: top-level configs/ of the checkout (setup.py)


class ConfigArgError(ValueError):
    """A config (name or file), variant or override given on the command line cannot be used; the message names the
    flag, the problem and the fix."""


def load_config(spec: str, overrides: Sequence[tuple[str, str]] | Mapping[str, str] = (), *,
                flag: str = "config") -> ml_collections.ConfigDict:
    """`get_config(variant)` of `spec` = 'NAME[:variant]' (a packaged config, `config_names()`) or
    'PATH[:variant]' (a config file), with `overrides` applied and the result locked.

    `overrides` are (dotted field path, value text) pairs in command-line order (a mapping is taken in its order);
    `flag` is the flag name used in messages (`--config`, `--vsr`). Raises ConfigArgError.
    """
    config = _call_get_config(spec, flag)
    _apply_overrides(config, list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides), flag)
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]], flag: str = "config"
                    ) -> None:
    """Apply (dotted field path, value text) pairs to `config` as `--FLAG.a.b=value` would (ConfigArgError)."""
    _apply_overrides(config, list(overrides), flag)


def parse_config_flags(argv: Sequence[str], names: Sequence[str] = ("config",)
                       ) -> tuple[dict[str, ml_collections.ConfigDict | None], list[str]]:
    """Take each `--NAME SPEC` (a packaged config name or a config file, each with an optional `:variant`) and its
    `--NAME.field=value` overrides out of `argv` (program name first) and load those configs; returns
    ({name: config, or None when not given}, the remaining argv for absl).

    Scanning stops at '--' (the rest is positional). A repeated `--NAME` keeps its last value. Raises
    ConfigArgError, e.g. for an override whose `--NAME` is missing.
    """
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    specs: dict[str, str] = {}
    spent: set[int] = set()
    for i in range(1, end):
        for name in names:
            token = argv[i]
            if re.fullmatch(rf"--?{re.escape(name)}", token):
                if i + 1 >= end or argv[i + 1].startswith("-"):
                    raise ConfigArgError(f"--{name} needs a value: a config file or a packaged config name, e.g. "
                                         f"--{name} base:tiny or --{name} path/to/config.py:tiny")
                specs[name] = argv[i + 1]
                spent.update((i, i + 1))
            elif re.match(rf"--?{re.escape(name)}=", token):
                specs[name] = token.split("=", 1)[1]
                spent.add(i)
    configs: dict[str, ml_collections.ConfigDict | None] = {}
    for name in names:
        # the file first: whether `--NAME.field VALUE` takes the next token depends on the field's type
        config = _call_get_config(specs[name], name) if name in specs else None
        overrides = list(_take_overrides(argv, end, name, config, spent))
        if config is not None:
            _apply_overrides(config, overrides, name)
        configs[name] = config
    return configs, [a for i, a in enumerate(argv) if i not in spent]


def config_names() -> tuple[str, ...]:
    """The packaged configs, by the name `--config NAME[:variant]` takes: the modules of lavie_jax.configs that
    define get_config() (the stages, and the demo's settings)."""
    found = []
    for entry in importlib.resources.files(PACKAGE).iterdir():
        name = entry.name.removesuffix(".py")
        if entry.name.endswith(".py") and name.isidentifier() and not name.startswith("_") and \
                b"def get_config" in entry.read_bytes():
            found.append(name)
    return tuple(sorted(found))


def config_fields(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    """Every dotted path of `config`: sections and leaf fields."""
    for key in config.keys():
        path = f"{prefix}{key}"
        yield path
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from config_fields(value, path + ".")


# ---------------------------------------------------------------------------------------------------- loading


def _call_get_config(spec: str, flag: str) -> ml_collections.ConfigDict:
    target, _, variant = spec.partition(":")
    has_variant = ":" in spec
    if not target:
        raise ConfigArgError(f"--{flag} is empty; pass a config file or a packaged config name, e.g. --{flag} "
                             "base:tiny")
    if is_run(Path(target)):
        if has_variant:
            raise ConfigArgError(f"--{flag} {spec}: a lavie-train work directory's config has no variants; drop "
                                 f"':{variant}'")
        return run_config(Path(target), flag)
    module, where = _config_module(target, flag, spec)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigArgError(f"--{flag} {spec}: {where} defines no get_config(); pass a stage config file"
                             f"{_nearby_configs(Path(target))}{_packaged_hint(flag)}")
    try:
        config = get_config(variant) if has_variant else get_config()
    except ValueError as e:  # the stage configs refuse unknown variants with a ValueError naming the choices
        raise ConfigArgError(f"--{flag} {spec}: {e}") from e
    except TypeError as e:
        if has_variant:
            raise ConfigArgError(f"--{flag} {spec}: get_config() of {where} takes no variant ({e}); drop "
                                 f"':{variant}'") from e
        raise ConfigArgError(f"--{flag} {spec}: get_config() of {where} failed: TypeError: {e}") from e
    except Exception as e:  # a broken config file: say which, and where the details are
        raise ConfigArgError(f"--{flag} {spec}: get_config() of {where} failed: {type(e).__name__}: {e} (fix the "
                             f"file; --traceback shows where)") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigArgError(f"--{flag} {spec}: get_config() of {where} returned {type(config).__name__}, not an "
                             f"ml_collections.ConfigDict")
    return config


RUN_MARKER, RUN_CONFIG = "lavie_workdir.json", "config.json"  # lavie_jax.io.workdir.MARKER, train.loop.CONFIG_FILE


def is_run(path: Path) -> bool:
    """Whether `path` is a lavie-train work directory."""
    return path.is_dir() and (path / RUN_MARKER).is_file()


def run_config(workdir: Path, flag: str = "config") -> ml_collections.ConfigDict:
    """The config a lavie-train run stored (`WORKDIR/config.json`: the latest run's, resumable changes included),
    typed by its stage's packaged config (JSON turned tuples into lists), unlocked until overrides are applied."""
    try:
        stored = json.loads((workdir / RUN_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ConfigArgError(f"--{flag} {workdir}: cannot read the run's config {workdir / RUN_CONFIG}: "
                             f"{getattr(e, 'strerror', None) or e}; pass the config it was trained with, "
                             f"--{flag} NAME[:variant]") from e
    stage = stored.get("stage") if isinstance(stored, dict) else None
    if stage not in config_names():
        raise ConfigArgError(f"--{flag} {workdir}: its {RUN_CONFIG} names no stage config (stage={stage!r}); pass "
                             f"the config it was trained with, --{flag} NAME[:variant]")
    config = _call_get_config(stage, flag)
    _overlay(config, stored)
    return config


def _overlay(section: ml_collections.ConfigDict, stored: Mapping[str, Any]) -> None:
    """Set `stored`'s values into `section`, lists back to tuples unless the field holds a list."""
    for key, value in stored.items():
        current = section.get(key)
        if isinstance(value, dict) and isinstance(current, ml_collections.ConfigDict):
            _overlay(current, value)
            continue
        if isinstance(value, list) and not isinstance(current, list):
            value = _tuples(value)
        with section.ignore_type():
            section[key] = value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _config_module(target: str, flag: str, spec: str) -> tuple[ModuleType, str]:
    """(module, how messages name it) of `target`: an existing file (run by path) wins over a packaged name, a
    packaged name over a directory of that name (which cannot be a config)."""
    path = Path(target)
    if path.exists() and not path.is_dir():
        return _load_file(path, flag, spec), target
    if target in config_names():
        name = f"{PACKAGE}.{target}"
        return _run_loading(lambda: importlib.import_module(name), name, flag, spec), name
    if path.is_dir():
        raise ConfigArgError(f"--{flag} {spec}: {target} is a directory; pass a config file in it"
                             f"{_nearby_configs(path / 'x.py')}{_packaged_hint(flag)}")
    if path.suffix or len(path.parts) > 1:  # written as a path
        stem = path.stem if path.stem in config_names() else ""
        suggestion = f"; did you mean the packaged --{flag} {stem}{spec[len(target):]}?" if stem else ""
        raise ConfigArgError(f"--{flag} {spec}: no such file {target}{_nearby_configs(path)}{suggestion}"
                             f"{_packaged_hint(flag)}")
    raise ConfigArgError(f"--{flag} {spec}: {target} is neither a config file nor a packaged config"
                         f"{_packaged_hint(flag)}, or pass a config file (PATH.py[:variant])")


def _packaged_hint(flag: str) -> str:
    names = config_names()
    example = "base:tiny" if "base" in names else (names[0] if names else "NAME")
    return f"; packaged configs: {', '.join(names)} (e.g. --{flag} {example})"


def _load_file(path: Path, flag: str, spec: str) -> ModuleType:
    """Execute the config file as a fresh module (sys.path untouched: it imports what is installed)."""
    name = f"_lavie_config_{flag.replace('-', '_')}_{abs(hash(str(path.absolute())))}"
    # an explicit source loader: a config file need not end in .py
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))

    def run() -> ModuleType:
        sys.modules[name] = module  # dataclasses and pickling look a module up by name while it runs
        try:
            loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module

    return _run_loading(run, str(path), flag, spec)


def _run_loading(load: Callable[[], ModuleType], where: str, flag: str, spec: str) -> ModuleType:
    """`load()`, its failures as one ConfigArgError naming the config `where`."""
    try:
        return load()
    except OSError as e:
        raise ConfigArgError(f"--{flag} {spec}: cannot read {where}: {e.strerror or e}") from e
    except SyntaxError as e:
        raise ConfigArgError(f"--{flag} {spec}: {where} is not a Python config file: {e.msg} at line {e.lineno}; "
                             "pass a file with get_config(), e.g. a copy of a packaged config") from e
    except ModuleNotFoundError as e:
        raise ConfigArgError(f"--{flag} {spec}: {where} failed to load: ModuleNotFoundError: {e} (config files run "
                             "as they are, sys.path unchanged: import shared pieces from an installed package, e.g. "
                             "`from lavie_jax.configs import common`, or set PYTHONPATH)") from e
    except Exception as e:
        raise ConfigArgError(f"--{flag} {spec}: {where} failed to load: {type(e).__name__}: {e} (fix the file; "
                             "--traceback shows where)") from e


def _nearby_configs(path: Path) -> str:
    """'; config files there: a.py, b.py' for the config files beside `path` (if its folder exists)."""
    folder = path.parent
    try:
        candidates = sorted(folder.glob("*.py"))[:100]  # a hint, not a search: a big folder is not read in full
        found = [str(p) for p in candidates if "def get_config" in p.read_text(errors="replace")]
    except OSError:
        return ""
    return f"; config files there: {', '.join(found)}" if found else ""


# -------------------------------------------------------------------------------------------------- overrides


def _apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]], flag: str) -> None:
    """Set each (path, value text) in order, then lock `config`."""
    collected: dict[str, tuple] = {}  # single values given to a tuple field several times, in order
    for path, text in overrides:
        value = _parse_override(config, path, text, flag)
        if isinstance(value, tuple):
            if re.search(r"[,()\[\]]", text):  # a whole tuple replaces what came before
                collected.pop(path, None)
            else:
                value = collected[path] = collected.get(path, ()) + value
        parent, key = _parent(config, path, flag)
        if parent.get_type(key) is type(None):
            with parent.ignore_type():  # an unset field takes any type
                parent[key] = value
        else:
            parent[key] = value
    config.lock()  # as config_flags did: a typo'd field name set later in code raises instead of adding a field


def _take_overrides(argv: list[str], end: int, name: str, config: ml_collections.ConfigDict | None,
                    spent: set[int]) -> Iterator[tuple[str, str]]:
    """(path, value text) of every `--NAME.path...` in argv[:end], marking their tokens spent."""
    pattern = re.compile(rf"--?(no)?{re.escape(name)}\.([^=]*)(=(.*))?", re.DOTALL)
    i = 1
    while i < end:
        match = pattern.fullmatch(argv[i]) if i not in spent else None
        if not match:
            i += 1
            continue
        negated, path, has_value, text = match.group(1), match.group(2), match.group(3), match.group(4)
        if config is None:
            raise ConfigArgError(f"{argv[i]} overrides a field of --{name}, which is not given; add --{name} "
                                 f"NAME[:variant] (a packaged config such as base:tiny, or a config file) or drop the "
                                 f"override")
        spent.add(i)
        if negated:
            if has_value or _field_type(config, path, name) is not bool:
                raise ConfigArgError(f"{argv[i]}: --no{name}.FIELD is for true/false fields only; use "
                                     f"--{name}.{path}=VALUE")
            yield path, "false"
        elif has_value:
            yield path, text
        else:
            # `--NAME.flag` alone is a boolean; any other field takes the next token, as absl flags do
            if _field_type(config, path, name) is bool:
                yield path, "true"
            elif i + 1 < end and i + 1 not in spent:
                spent.add(i + 1)
                yield path, argv[i + 1]
                i += 1
            else:
                raise ConfigArgError(f"--{name}.{path} needs a value: --{name}.{path}=VALUE")
        i += 1


def _field_type(config: ml_collections.ConfigDict, path: str, flag: str) -> type:
    parent, key = _parent(config, path, flag)
    return parent.get_type(key)


def _parent(config: ml_collections.ConfigDict, path: str, flag: str) -> tuple[ml_collections.ConfigDict, str]:
    """The section holding `path` and its last key; ConfigArgError with a did-you-mean if the path is not there."""
    keys = path.split(".")
    section = config
    for depth, key in enumerate(keys):
        here = ".".join(keys[:depth + 1])
        if not isinstance(section, ml_collections.ConfigDict):
            field = ".".join(keys[:depth])
            raise ConfigArgError(f"--{flag}.{path}: {field} is a field (now {section!r}), not a section; set it as "
                                 f"--{flag}.{field}=VALUE")
        if key not in section:
            raise ConfigArgError(f"--{flag}.{path}: the config has no field {here}{_did_you_mean(config, here, flag)}")
        if depth == len(keys) - 1:
            return section, key
        section = section[key]
    raise AssertionError("unreachable")


def _did_you_mean(config: ml_collections.ConfigDict, path: str, flag: str) -> str:
    """'; did you mean --config.sample.steps?' from the config's own fields, else the fields of that section."""
    fields = list(config_fields(config))
    close = difflib.get_close_matches(path, fields, n=3, cutoff=0.75)
    if not close:  # a right name in the wrong section (`--config.steps`), else a typo in the last name
        last = path.rsplit(".", 1)[-1]
        names = {f: f.rsplit(".", 1)[-1] for f in fields}
        close = [f for f in fields if names[f] == last][:3]
        if not close:
            similar = difflib.get_close_matches(last, set(names.values()), n=2, cutoff=0.75)
            close = [f for f in fields if names[f] in similar][:3]
    if close:
        return "; did you mean " + " or ".join(f"--{flag}.{f}" for f in close) + "?"
    head = path.rsplit(".", 1)[0] if "." in path else ""
    section = config
    for key in head.split(".") if head else ():
        section = section[key]
    where = f"section {head}" if head else "the config"
    return f"; the fields of {where} are: {', '.join(sorted(section.keys()))}"


def _parse_override(config: ml_collections.ConfigDict, path: str, text: str, flag: str) -> Any:
    """`text` as a value of the field at `path`, by the type of its current value."""
    parent, key = _parent(config, path, flag)
    current = parent[key]
    kind = parent.get_type(key)

    def refuse(expected: str) -> ConfigArgError:
        return ConfigArgError(f"--{flag}.{path}={text}: {path} takes {expected} (now {current!r}); {text!r} is not "
                              f"one")

    if isinstance(current, ml_collections.ConfigDict):
        example = next(iter(current.keys()), "FIELD")
        raise ConfigArgError(f"--{flag}.{path}: {path} is a section; set its fields one by one, e.g. "
                             f"--{flag}.{path}.{example}=VALUE")
    if kind is bool:
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        raise refuse("true or false")
    if kind is int:
        try:
            return int(text.strip(), 0)  # base prefixes as absl's integer flags (0x10)
        except ValueError:
            try:
                return int(text.strip())  # int(..., 0) refuses leading zeros ('007')
            except ValueError:
                raise refuse("an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise refuse("a number") from None
    if kind is str:
        return text
    if kind in (tuple, list):
        value = _literal(text)
        if isinstance(value, str) and "," in text:  # '2,4,1,1' without brackets
            value = tuple(_literal(part.strip()) for part in text.split(","))
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        return value if kind is tuple else list(value)
    if kind is type(None):  # unset optional field (e.g. model.attention_impl): any literal, else the text
        return None if text.strip().lower() in _NONE else _literal(text)
    raise ConfigArgError(f"--{flag}.{path}: a field of type {kind.__name__} cannot be set from the command line; "
                         "edit the config file")


def _literal(text: str) -> Any:
    """A Python literal (numbers, tuples, lists, true/false), else the text itself."""
    if text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text
