"""The command-line options of ``mars train`` and ``mars compare``, generated
from the configuration's field metadata (:mod:`mars.config`).

Every field of :class:`mars.config.TrainConfig` (and of its model and the
model's sections) becomes one option, ``--<name>`` with dashes unless the
field names its ``flag``; its help is the field's; ``advanced`` fields are
listed by ``--help-all`` only. Options have no argparse default: what is not
given comes from ``--config FILE`` (a JSON object in ``config.json``'s form,
any subset of it), then from the method's defaults, so a default is written
once, in the configuration.
"""
from __future__ import annotations

import argparse
from typing import Callable

from . import methods
from .config import (
    ADVANCED_MARS,
    SECTIONS,
    V1_DEFAULTS,
    ConfigError,
    TrainConfig,
    field_paths,
    used_by,
)

__all__ = ["add_config_options", "given_values", "config_for", "option_of", "file_values", "flag_paths", "HelpAll"]

_FLAT = {"model.method": "method"}  # fields whose dest differs from their path


def _flag(path: str, f, section: str | None) -> str:
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    prefix = SECTIONS[section][1] if section else ""
    return "--" + prefix + f.name.replace("_", "-")


def _kind(f) -> str:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return kind.replace(" | None", "")


def _default_text(path: str) -> str:
    # defaults that depend on the method are the method's own (said in the help)
    if path in ("masks_per_step", "lr", "model.dropout", "model.lambda_unimodal", "model.unimodal_vote",
                "model.backend", "model.method"):
        return ""
    try:
        value = _lookup(TrainConfig(), path)
    except AttributeError:
        return ""
    return f" (default: {value})"


def _lookup(cfg, path: str):
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class HelpAll(argparse.Action):
    """``--help-all``: the help with every option, the advanced ones too."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        for action in parser._actions:
            hidden = getattr(action, "advanced_help", None)
            if hidden is not None:
                action.help = hidden
        parser.print_help()
        parser.exit()


def add_config_options(p: argparse.ArgumentParser, method_type: Callable, *, with_method: bool = True) -> None:
    """One option per configuration field, grouped: the run, the model, then
    each section (MARS, research variants, MoE-Retriever, MCE)."""
    titles = {None: "run", "mars": "MARS (mars; router_mlp and lambda_balance also vanilla-moe)",
              "research": "MARS variants under study", "retriever": "MoE-Retriever (--method moe-retriever)",
              "mce": "MCE (--method mce)", "late_fusion": "late fusion (--method late-fusion)"}
    groups: dict = {}
    advanced = 0
    for path, f, section in field_paths():
        if path == "model.method" and not with_method:
            continue
        group_key = section if section else ("model" if path.startswith("model.") else None)
        if group_key not in groups:
            groups[group_key] = p.add_argument_group(titles.get(group_key, "model"))
        g = groups[group_key]
        meta, kind = f.metadata, _kind(f)
        help_text = meta.get("help", "") + _default_text(path)
        users = used_by(path)
        if len(users) < len(methods.names()) and section is None and path != "model.method":
            help_text += " [" + ", ".join(methods.get(m).cli_name for m in users) + "]"
        kwargs: dict = dict(dest=path, default=argparse.SUPPRESS, help=help_text)
        if path == "model.method":
            kwargs.update(type=method_type, metavar="METHOD")
        elif kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[kind]
            if meta.get("choices") is not None:
                kwargs["choices"] = meta["choices"]
            if meta.get("choices") is None:
                kwargs["metavar"] = meta.get("metavar") or {"int": "N", "float": "X"}.get(kind, f.name.upper())
        flags = ["--missing", "--protocol"] if path == "protocol" else [_flag(path, f, section)]
        action = g.add_argument(*flags, **kwargs)
        if meta.get("advanced") or path in ADVANCED_MARS:
            action.advanced_help, action.help = action.help, argparse.SUPPRESS
            advanced += 1
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, dest="config_file",
                   help="a JSON object in config.json's form (any subset of it) giving option values; options on "
                        "the command line win")
    p.add_argument("--help-all", action=HelpAll,
                   help=f"show every option, also the {advanced} advanced ones (they can be set in --config FILE too)")


def flag_paths() -> dict[str, str]:
    """{option spelling without the dashes, with underscores: field path}
    (``experts`` -> ``model.num_experts``, ``retriever_k`` ->
    ``model.retriever.k``): the flat names of every configuration field."""
    return {_flag(path, f, section)[2:].replace("-", "_"): path for path, f, section in field_paths()}


def option_of(parser: argparse.ArgumentParser, path: str) -> str:
    """The command-line option of a configuration field (``model.num_experts``
    -> ``--experts``), or the path when the command has no such option."""
    for action in parser._actions:
        if action.dest == path and action.option_strings:
            return action.option_strings[0]
    return path


def given_values(namespace: argparse.Namespace) -> dict:
    """{field path: value} of the configuration options on the command line."""
    known = {path for path, _, _ in field_paths()}
    return {k: v for k, v in vars(namespace).items() if k in known}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and (prefix + k in ("model",) or (prefix == "model." and k in SECTIONS)):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def file_values(obj, source: str) -> dict:
    """{field path: value} of a ``--config`` file's JSON object: any subset of
    this version's ``config.json``, or a whole version-1 ``config.json`` of an
    earlier release (read as it meant then); unknown keys raise."""
    if not isinstance(obj, dict):
        raise ConfigError("config", f"{source}: expected a JSON object, got {type(obj).__name__}")
    known = {path for path, _, _ in field_paths()}
    values = _flatten({k: v for k, v in obj.items() if k != "version"})
    unknown = sorted(set(values) - known)
    v1_keys = {f"model.{k}" for k in V1_DEFAULTS["model"]} | set(V1_DEFAULTS)
    if obj.get("version") == 1 or ("version" not in obj and unknown and set(unknown) <= v1_keys):
        try:
            values = _flatten({k: v for k, v in TrainConfig.from_dict(obj).to_dict().items() if k != "version"})
        except ConfigError as e:
            raise ConfigError(e.field, f"{e.message} (in {source})") from None
        unknown = []
    if unknown:
        raise ConfigError("config", f"{source}: unknown keys {unknown}")
    return values


def config_for(method: str, values: dict, *, strict: bool, origin: dict | None = None) -> TrainConfig:
    """The configuration of ``method`` with ``values`` ({field path: value})
    over its defaults. ``strict``: a value the method does not read is a
    :class:`ConfigError` naming it (``origin`` maps a path to where it was
    given, for the message); otherwise such values are left out (``mars
    compare`` gives each method the options it reads)."""
    nested: dict = {"version": 2, "model": {"method": method}}
    for path, value in values.items():
        if path == "model.method":
            continue
        if method not in used_by(path):
            if strict:
                where = (origin or {}).get(path, "")
                raise ConfigError(path, f"is not used by {methods.get(method).cli_name} (only by "
                                        f"{', '.join(methods.get(m).cli_name for m in used_by(path))})"
                                        + (f"; given in {where}" if where else ""))
            continue
        node = nested
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = None if path == "model.backend" and value == "auto" else value
    return TrainConfig.from_dict(nested)
