"""Typed configs: frozen dataclasses filled from defaults < TOML file < CLI flags.

One dataclass per concept; its field defaults are the only defaults. `load_config` refuses
unknown keys (with a did-you-mean), coerces TOML/CLI values to the field types, and
`write_resolved` saves the resolved config beside an output so any run can be reproduced.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import os
import re
import textwrap
import tokenize
import tomllib
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Mapping, TypeVar

import tomli_w

from kdpipe.storage.errors import ConfigError

C = TypeVar("C")


class RenamedKeyWarning(FutureWarning):
    """An old key or flag name was used; it still works, under its new name."""


@functools.lru_cache(maxsize=None)
def field_help(cls: type) -> dict[str, str]:
    """Each field's description: its trailing `# ...` comment in the class source (or metadata["help"]).

    The dataclass is the one source of every option's help: `--help` of a command and the docs
    read the same comments, so a field added with a comment documents itself.
    """
    out: dict[str, str] = {}
    for c in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(c):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(c))
        except (OSError, TypeError):
            continue
        comments = {
            tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(src).readline)
            if tok.type == tokenize.COMMENT
        }
        body = ast.parse(src).body[0]
        for node in getattr(body, "body", []):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                text = comments.get(node.end_lineno) or comments.get(node.lineno)
                if text:
                    out[node.target.id] = text
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            out[f.name] = f.metadata["help"]
    return out


def field_default(f: dataclasses.Field) -> Any:
    """The default of a field (MISSING when required)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def format_default(value: Any) -> str:
    """A default as a user writes it: true/false, none, comma-separated lists."""
    if value is dataclasses.MISSING:
        return "required"
    if value is None or value == "" or (isinstance(value, (tuple, list)) and not value):
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    if isinstance(value, str) and (not value.strip() or "\n" in value):
        return repr(value)
    return str(value)


def _renamed(cls: type) -> Mapping[str, str]:
    """old key -> field, for keys a config class still accepts under an old name (with a warning)."""
    return getattr(cls, "RENAMED", {}) or {}


def suggest(key: str, allowed, synonyms: dict[str, str] | None = None) -> str:
    """" (did you mean 'x'?)" for a mistyped key: a known synonym first (job files: spec.SYNONYMS), else the
    closest allowed key; "" when none is close. The one did-you-mean of configs and job files."""
    allowed = list(allowed)
    if synonyms and synonyms.get(key) in allowed:
        return f" (did you mean '{synonyms[key]}'?)"
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, where: str, strict: bool = True) -> Any:
    """Coerce a TOML/CLI value to a dataclass field type, or raise ConfigError naming `where`.

    strict (TOML and job files): a quoted "6" where a number goes is refused, since TOML has numbers
    and a string there is a slip; command-line flags (strict=False) arrive as text and are parsed.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, strict)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]", strict) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table of keys, got {value!r}")
        return build_config(tp, value, where=where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float) and strict and isinstance(value, str):
        what = "an integer" if tp is int else "a number"
        raise ConfigError(f"{where}: expected {what}, got the string {value!r}; write the number without quotes")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def build_config(cls: type[C], values: Mapping[str, Any], where: str = "config", text_keys: frozenset[str] | set[str] = frozenset()) -> C:
    """Build `cls` from a mapping; unknown keys and bad types raise ConfigError naming `where.key`.

    text_keys: keys whose values came from command-line flags (text that may spell a number);
    every other value must have its type already (a TOML "6" for an integer is refused).
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    renamed = _renamed(cls)
    for key, value in values.items():
        k = key.replace("-", "_")
        if k in renamed and k not in fields:
            new = renamed[k]
            warnings.warn(
                f"{where}: '{key}' is the old name of '{new}'; it still works, but rename it to '{new}'",
                RenamedKeyWarning, stacklevel=2,
            )
            if new in values or new.replace("_", "-") in values:
                raise ConfigError(f"{where}: both '{key}' (old name) and '{new}' are set; keep only '{new}'")
            k = new
        if k not in fields:
            raise ConfigError(
                f"{where}: unknown key '{key}'{suggest(k, list(fields))}; allowed keys: {', '.join(fields)}"
            )
        kwargs[k] = _coerce(value, hints[k], f"{where}.{k}", strict=key not in text_keys and k not in text_keys)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from None


def looks_like_path(model: str) -> bool:
    """A model value that can only be a local path: a hub id is NAME or ORG/NAME, so "./m", "/m", "~/m"
    and "a/b/c" are paths (the hub loader would answer "Repo id must be in the form ..." for them)."""
    return model.startswith((".", "/", "~", os.sep)) or model.count("/") > 1


def check_model_dir(model: str, what: str) -> None:
    """Refuse a model that cannot be found before any hub loader sees it: a local path that does not exist, or a
    hub id (NAME, ORG/NAME) that is neither a local directory nor in the hub cache while the hub cannot be reached
    (huggingface_hub would retry for ~25 s per file before its own error)."""
    if Path(os.path.expanduser(model)).exists():
        return
    if looks_like_path(model):
        raise ConfigError(f"{what}: no such directory: {model}; point it at a model directory (config.json, "
                          "weights, tokenizer) or give a hub id (ORG/NAME)")
    host = _unreachable_hub_host(model)
    if host is not None:
        raise ConfigError(f"{what}: {model!r} is not a local directory, and as a hub id it is not in the hub cache and "
                          f"{host} cannot be reached (no name resolution); give the model directory's path (there is no "
                          f"{model} in the working directory {Path.cwd()}) or connect to the hub")


def _unreachable_hub_host(model: str) -> str | None:
    """The hub's host when a hub id cannot be loaded at all: online mode, not cached, the host's name does not
    resolve. None when it may load (offline mode reads the cache itself and fails at once; a resolvable host or a
    cached copy is the loader's business)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        if isinstance(try_to_load_from_cache(model, "config.json"), str):
            return None
    except ValueError:  # not a valid repo id at all: the loader's own message says so
        return None
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return host
    return None


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); fix the syntax at the position given") from None


def load_config(
    cls: type[C],
    toml_path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    section: str | None = None,
    flag_names: Mapping[str, str] | None = None,
    command: str | None = None,
) -> C:
    """defaults < TOML file (optionally one [section]) < overrides (CLI flags that were given).

    With `flag_names` (field -> "--flag", from the command), an error about a value given on
    the command line names the flag the user typed (`--top-k`), one about a TOML value names
    its key (`top_k`), and a missing required value names the flag.
    """
    values: dict[str, Any] = {}
    where = command or cls.__name__
    if toml_path is not None:
        data = read_toml(toml_path)
        if section is not None:
            data = data.get(section, {})
        values.update(data)
        where = f"{toml_path}" + (f" [{section}]" if section else "")
    given: set[str] = set()
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k.replace("-", "_")] = v
            given.add(k.replace("-", "_"))
    if flag_names:
        present = {_renamed(cls).get(k.replace("-", "_"), k.replace("-", "_")) for k in values}
        missing = [
            f.name for f in dataclasses.fields(cls)
            if f.init and f.name not in present and field_default(f) is dataclasses.MISSING
        ]
        if missing:
            opts = ", ".join(flag_names.get(m, m) for m in missing)
            also = " (or set " + ", ".join(missing) + f" in {toml_path})" if toml_path is not None else ""
            raise ConfigError(f"{command or cls.__name__}: missing required option(s) {opts}{also}")
    try:
        return build_config(cls, values, where=where, text_keys=given)
    except ConfigError as e:
        if not flag_names:
            raise
        raise ConfigError(name_flags(str(e), given, flag_names, where)) from None


def name_flags(message: str, given: set[str], flag_names: Mapping[str, str], where: str) -> str:
    """Rewrite field names in an error as the flags they were given by (`top_k:` -> `--top-k:`)."""
    for name in sorted(given, key=len, reverse=True):
        flag = flag_names.get(name)
        if not flag:
            continue
        message = message.replace(f"{where}.{name}", flag)
        message = re.sub(rf"(?<![\w.-]){re.escape(name)}(?=\s*[:=\[])", flag, message)
    return message


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a (nested) config with None values dropped (TOML has no null)."""

    def clean(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: clean(getattr(v, f.name)) for f in dataclasses.fields(v) if getattr(v, f.name) is not None}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, Path):
            return str(v)
        return v

    return clean(cfg)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via `.tmp` + fsync + os.replace: readers see the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_resolved(cfg: Any, path: str | os.PathLike, header: str = "") -> None:
    """Save the resolved config as TOML (loadable again with --config); `header`: comment lines on top
    (what a value such as "auto" resolved to, where the weights came from)."""
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    atomic_write_text(path, comments + tomli_w.dumps(config_to_dict(cfg)))
