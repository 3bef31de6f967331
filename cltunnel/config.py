"""Scenario YAML -> typed, validated configuration.

Every section is a dataclass; unknown keys are refused with the closest valid name, values are coerced
to the field's type (YAML 1.1 reads ``1e-4`` as a string), and each error names its key path.

This module holds what every run shares. A protocol's own section (``erosion:``, ...) lives in the protocol's
module, which registers it with :func:`register_section` on import; :class:`RunConfig` keeps it in
``protocol_sections`` and reads it as ``cfg.<name>``. So whatever parses a scenario imports the protocols first
(the entry points import :mod:`cltunnel.experiments`), and a section nobody registered is an unknown key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cltunnel.errors import CltunnelError
from cltunnel.registry import Registry, did_you_mean


class ConfigError(CltunnelError, ValueError):
    """A scenario file that cannot be run, with the key that is wrong."""


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: str | None = None  # npz directory; default $CLTUNNEL_DATA
    source: str = "auto"  # auto | npz | torchvision
    download: bool = False  # let torchvision download when online
    cache_dir: str | None = None
    test_rows: str = "all"  # all | lossless: which test rows the accuracy matrix uses
    train_per_class: int | None = None  # cap on training images per class (CPU-sized runs)
    test_per_class: int | None = None  # cap on test images per class (taken among the chosen rows)


@dataclass
class ScenarioConfig:
    tasks: list[int] | None = None  # classes per task, e.g. [5, 5], [3, 7]
    n_tasks: int | None = None  # or: equal split into n tasks
    class_order: list[int] | None = None  # default: 0..C-1
    mode: str = "task"  # task: one head per task (task-incremental) | class: one shared head


@dataclass
class ModelConfig:
    name: str = "vgg19"
    width: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)  # extra builder arguments (depth, conv_layers, ...)


@dataclass
class TrainingConfig:
    epochs: int = 30  # per task
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_milestones: list[int] = field(default_factory=list)  # epochs (within a task) where lr *= lr_gamma
    lr_gamma: float = 0.1
    lr_schedule: str = "step"  # step (lr *= lr_gamma at lr_milestones) | cosine (lr to 0 over each task's epochs, per epoch)
    augment: bool = True  # random crop (4 px padding) + horizontal flip, on the device
    temperature: float = 1.0  # logits divided by T in the training loss
    eval_batch_size: int = 1000
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    channels_last: str = "auto"  # auto (on CUDA) | on | off
    compile: bool = False  # torch.compile the body alone (capture, below, compiles the whole step)
    capture: str = "auto"  # auto (on CUDA) | on | off: forward, loss, backward and SGD as one compiled step
    checkpoint_every: int = 0  # also save the model every N epochs (tunnel development); 0 = per task only
    resume_every: int = 0  # inside a task, a resumable state every N epochs (long tasks); 0 = at task ends only


@dataclass
class StrategyConfig:
    name: str | None = "naive"  # a registered name (cltunnel list)
    cls: str | None = None  # or "package.module:ClassName" (YAML key: class)
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoggingConfig:
    """What a run records besides its accuracy matrix; none of it changes the run's numbers."""

    tensorboard: bool = True  # event files under <run>/tensorboard: per-epoch loss/accuracy, accuracy matrix, probes
    eval_every: int = 0  # > 0: test accuracy of the tasks seen so far every N epochs in history.csv (else at task ends)
    report: bool = True  # report.html and report.md after `cltunnel run`


# Avalanche's metrics and loggers by the names a scenario gives them (training.avalanche_metrics builds them).
EVAL_METRICS = ("accuracy", "loss", "forgetting", "bwt", "class_accuracy", "timing", "confusion_matrix")
EVAL_LOGGERS = ("text", "csv", "tensorboard", "interactive")


@dataclass
class EvaluationConfig:
    """Avalanche's own evaluation, run on the test stream after every task beside cltunnel's accuracy matrix."""

    metrics: list[str] = field(default_factory=list)  # EVAL_METRICS names, or "package.module:factory"
    loggers: list[str] = field(default_factory=list)  # EVAL_LOGGERS names (text, csv, tensorboard: files in the run)


TUNNEL_RULE_NAMES = ("last", "peak", "rank")  # defined in cltunnel.measures.tunnel
PROBE_PROTOCOLS = ("thesis", "official")  # see cltunnel.measures.probes.protocol_config


@dataclass
class AnalysesConfig:
    run: list[str] = field(default_factory=list)  # after training: registered names or "module:function" (preflight)
    tunnel_start: str = "auto"  # extractor = layers 1..k: "auto" (probes of the model after task 1) or k
    tunnel_rule: str = "last"  # how "auto" picks k: last | peak | rank (cltunnel.measures.tunnel, README)
    tunnel_threshold: float | None = None  # the rule's share (default: last 0.95, peak 0.95, rank 0.10)
    probe_protocol: str = "thesis"  # thesis | official (e7mul/tunnel_project: 80/20 split, 1e-3 |W|, <=10k dims)
    probe: dict[str, Any] = field(default_factory=dict)  # ProbeConfig overrides (epochs, lr, batch_size, ...)
    rank_samples: int = 10000  # training rows (at most) whose representations give the numerical rank (capped at rows - 1)
    rank_threshold: float = 1e-3  # singular values above sigma_1 * this count towards the rank
    ood_data: str = "mnist"  # out-of-distribution probes: a dataset rendered in the run's input format
    ood_classes: list[int] = field(default_factory=list)  # its classes to probe (empty: the first 10)
    ood_train_per_class: int = 500  # probe training images per class
    ood_test_per_class: int = 200  # probe test images per class
    block_threshold: float = 0.9  # block structure: the longest run of layers whose pairwise CKA are all at least this
    block_min_layers: int = 3  # ... spanning at least this many layers (else: no block)
    block_pc_iterations: int = 30  # whole-set first PCs: at most this many subspace iterations (2 passes each)
    block_pc_tolerance: float = 1e-6  # ... stopping when every PC's residual |Ku - λu| / λ is below this
    block_pooled_stages: int = 2  # the pooled first-PC share: over the last this many stages (Fig. D.5)
    block_residual_probes: bool = True  # probes before and after each residual addition (Fig. E.1)



@dataclass
class RunConfig:
    name: str = "scenario"
    data: DataConfig = field(default_factory=DataConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "auto"
    output_dir: str = "runs"
    analyses: AnalysesConfig = field(default_factory=AnalysesConfig)
    # The protocol's section, by name (at most one selects the protocol; cltunnel.experiments); in YAML and
    # config.yaml each is a top-level key (erosion: ...), and cfg.erosion reads it (None when unset).
    protocol_sections: dict[str, Any] = field(default_factory=dict)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    expect: dict[str, Any] = field(default_factory=dict)  # bands [low, high] the run checks (cltunnel.expectations)

    def to_dict(self) -> dict[str, Any]:
        """Plain data as the YAML reads (and config.yaml is written): each protocol section a top-level key."""
        out: dict[str, Any] = {}
        for key, value in dataclasses.asdict(self).items():
            if key == "protocol_sections":
                out.update({name: value.get(name) for name, section in PROTOCOL_SECTIONS.items()
                            if section.listed_when_unset or name in value})
            else:
                out[key] = value
        out["strategy"]["class"] = out["strategy"].pop("cls")
        return out

    def fingerprint(self) -> str:
        """Hash of what determines a run's numbers, so a checkpoint from another config is refused.

        The seed list, device, output place, post-training analyses and what is logged do not change a run's
        training.
        """
        d = self.to_dict()
        for key in ("seeds", "device", "output_dir", "analyses", "name", "logging", "evaluation", "expect"):
            d.pop(key)
        d["training"].pop("resume_every")  # how often state is saved does not change the numbers
        if d["training"]["capture"] == "auto":  # runs from before the setting keep their fingerprint
            d["training"].pop("capture")
        if d["training"]["lr_schedule"] == "step":  # likewise
            d["training"].pop("lr_schedule")
        for name, section in PROTOCOL_SECTIONS.items():  # runs from before these sections keep their fingerprint
            if d.get(name) is None:
                d.pop(name, None)
            elif section.sparse_fingerprint:
                defaults = dataclasses.asdict(section.config())
                d[name] = {k: v for k, v in d[name].items() if v != defaults[k]}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def __getattr__(self, name: str) -> Any:
        """``cfg.erosion``: a registered protocol section, None when unset (called only for names that are not
        fields, so the fields read as usual)."""
        if name in PROTOCOL_SECTIONS and not name.startswith("_"):
            return self.__dict__.get("protocol_sections", {}).get(name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        """``cfg.erosion = ErosionConfig(...)`` sets the section (None unsets it)."""
        if name not in self.__dataclass_fields__ and name in PROTOCOL_SECTIONS:
            others = {k: v for k, v in self.protocol_sections.items() if k != name}  # a new mapping: a copy made
            value = others if value is None else {**others, name: value}  # by dataclasses.replace keeps its own
            name = "protocol_sections"
        object.__setattr__(self, name, value)


@dataclass(frozen=True)
class ProtocolSection:
    """A protocol's own YAML section (``erosion:``, ...), registered by the protocol's module with
    :func:`register_section`: the config layer parses, validates, saves and fingerprints it without naming it."""

    name: str
    config: type  # its dataclass; an optional ``validate(self, cfg: RunConfig)`` checks what needs more than a field
    order: int = 100  # its place among the sections in a saved config.yaml
    listed_when_unset: bool = False  # config.yaml lists it as null when unset (as it did the built-in sections)
    sparse_fingerprint: bool = False  # the fingerprint counts only its keys that differ from the defaults
    needs_scenario: bool = True  # False: the protocol makes its own tasks (scenario.tasks/n_tasks may be left out)


# The sections that select a protocol other than the task sequence, in their config.yaml order; filled by the
# protocol modules (cltunnel.experiments) when they are imported, so the entry points import them before
# parsing a scenario.
PROTOCOL_SECTIONS: Registry[ProtocolSection] = Registry("protocol section", ConfigError)


def register_section(name: str, config: type, *, order: int = 100, listed_when_unset: bool = False,
                     sparse_fingerprint: bool = False, needs_scenario: bool = True) -> type:
    """Make ``name:`` a scenario section parsed into the dataclass ``config`` (``cfg.<name>``, None when unset;
    registered again, the later one counts). ``listed_when_unset`` and ``sparse_fingerprint`` keep the saved
    config.yaml and the fingerprint of the built-in protocols' runs as they were before their sections moved
    into their modules; a new protocol leaves them off, so it changes no other scenario's saved config."""
    if name in {f.name for f in dataclasses.fields(RunConfig)}:
        raise ValueError(f"protocol section '{name}' would hide the shared section of that name")
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"protocol section '{name}': {config!r} is not a dataclass")
    PROTOCOL_SECTIONS.register(name, ProtocolSection(name, config, order, listed_when_unset, sparse_fingerprint,
                                                     needs_scenario))
    PROTOCOL_SECTIONS.sort(lambda section: section.order)
    return config


# Names users bring from other frameworks, suggested when spelling alone finds nothing close.
SYNONYMS = {"learning_rate": "lr", "wd": "weight_decay", "epochs_per_task": "epochs", "batch": "batch_size",
            "dataset": "data", "arch": "model", "architecture": "model", "seed": "seeds", "classes": "tasks",
            "n_experiences": "n_tasks", "per_exp_classes": "tasks", "fixed_class_order": "class_order"}


def closest(key: str, valid: list[str]) -> str:
    """`` (did you mean 'x'?)`` by spelling, or by the synonyms above; ``""`` if nothing is close."""
    if SYNONYMS.get(key) in valid:
        return f" (did you mean '{SYNONYMS[key]}'?)"
    return did_you_mean(key, valid)


def coerce(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if hint is type(None) or type(None) in args:
            return None
        raise ConfigError(f"{path}: must not be empty")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {[f.name for f in dataclasses.fields(hint)]}, got {value!r}")
        return _build(hint, value, path)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is Any:
        if origin is dict and not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (hint is int and not number.is_integer()):
            raise ConfigError(f"{path}: expected {'an integer' if hint is int else 'a number'}, got {value!r}")
        return hint(number)
    if hint is str:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted on/off (and yes/no) as a boolean
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def _yaml_keys(cls: type) -> list[str]:
    """The keys a section of ``cls`` takes, as the YAML spells them: the top level has the registered protocol
    sections where RunConfig holds them, and ``strategy:`` says ``class`` for ``cls``."""
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        if cls is RunConfig and f.name == "protocol_sections":
            keys += list(PROTOCOL_SECTIONS)
        elif not (cls is StrategyConfig and f.name == "cls"):
            keys.append(f.name)
    return keys + (["class"] if cls is StrategyConfig else [])


def _build(cls: type, raw: dict[str, Any], path: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    valid = _yaml_keys(cls)
    kwargs: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in valid:
            raise ConfigError(f"unknown key '{where}'{closest(str(key), valid)}; valid keys here: {', '.join(valid)}")
        if cls is RunConfig and key in PROTOCOL_SECTIONS:
            section = coerce(value, typing.Optional[PROTOCOL_SECTIONS[key].config], where)
            if section is not None:
                sections[key] = section
        else:
            attr = "cls" if cls is StrategyConfig and key == "class" else key
            kwargs[attr] = coerce(value, hints[attr], where)
    if sections:
        kwargs["protocol_sections"] = sections
    return cls(**kwargs)


def _normalise_strategy(raw: dict[str, Any]) -> None:
    """Accept ``strategy: ewc`` as shorthand for ``strategy: {name: ewc}``; a class overrides the name."""
    strategy = raw.get("strategy")
    if isinstance(strategy, str):
        raw["strategy"] = {"name": strategy}
    elif isinstance(strategy, dict) and "class" in strategy and "name" not in strategy:
        raw["strategy"] = {**strategy, "name": None}


def _discover_protocols() -> None:
    """Register the built-in protocols' sections before a config is read: a saved ``config.yaml`` lists every
    built-in section (``erosion: null``, ...), so a notebook's ``load_config`` must know them without having
    imported the experiments. Imported by name, once: the protocols sit above this layer and fill its registry
    (a plugin discovery, not a dependency: this module uses nothing of theirs)."""
    import importlib

    importlib.import_module("cltunnel.experiments")


def parse_config(raw: dict[str, Any], default_name: str = "scenario") -> RunConfig:
    _discover_protocols()
    if not isinstance(raw, dict):
        raise ConfigError(f"a scenario must be a YAML mapping, got {type(raw).__name__}")
    raw = dict(raw)
    raw.setdefault("name", default_name)
    _normalise_strategy(raw)
    cfg = _build(RunConfig, raw)
    validate(cfg)
    return cfg


def read_yaml(path: str | Path, what: str, keys: set[str] | None = None) -> dict[str, Any]:
    """A YAML file of cltunnel's (scenario, sweep, campaign plan) as a mapping; a missing file, invalid YAML
    or (with ``keys``) an unknown top-level key is a one-line error naming the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML: {getattr(err, 'problem', None) or err}{where}") from None
    unknown = sorted(set(raw) - keys) if keys is not None else []
    if unknown:
        raise ConfigError(f"{path}: unknown {what} keys {unknown}; valid: {', '.join(sorted(keys))}")
    return raw


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    path = Path(path)
    raw = read_yaml(path, "scenario")
    for dotted, value in (overrides or {}).items():
        if dotted.startswith("strategy."):
            _override_strategy(raw, dotted)
        set_dotted(raw, dotted, value)
    try:
        return parse_config(raw, default_name=path.stem)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _override_strategy(raw: dict[str, Any], dotted: str) -> None:
    """``--set strategy.class=...`` (or ``.name``) whatever form ``strategy:`` had: a bare name becomes a
    mapping, and the override replaces the other way of naming the strategy (a class wins over a name)."""
    strategy = raw.get("strategy")
    if isinstance(strategy, str):
        raw["strategy"] = strategy = {"name": strategy}
    if isinstance(strategy, dict):
        other = {"strategy.class": "name", "strategy.name": "class"}.get(dotted)
        if other:
            strategy.pop(other, None)


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for i, key in enumerate(keys[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{'.'.join(keys[:i + 1])}' is {node!r}, not a section with keys")
    node[keys[-1]] = value


CHOICES = {
    "data.source": ("source", ("auto", "npz", "torchvision")),
    "data.test_rows": ("test_rows", ("all", "lossless")),
    "scenario.mode": ("mode", ("task", "class")),
    "training.amp": ("amp", ("auto", "bf16", "off")),
    "training.channels_last": ("channels_last", ("auto", "on", "off")),
}


def validate(cfg: RunConfig) -> None:
    """Checks that need more than one field; split sizes are checked against the dataset in scenarios."""
    sections = {"data": cfg.data, "scenario": cfg.scenario, "training": cfg.training}
    for where, (attr, allowed) in CHOICES.items():
        value = getattr(sections[where.split(".")[0]], attr)
        if value not in allowed:
            raise ConfigError(f"{where}: '{value}' is not one of {', '.join(allowed)}")
    needs_scenario = all(PROTOCOL_SECTIONS[name].needs_scenario for name in cfg.protocol_sections)
    if cfg.scenario.tasks is None and cfg.scenario.n_tasks is None and needs_scenario:
        raise ConfigError("scenario: give either 'tasks' (classes per task, e.g. [5, 5]) or 'n_tasks'")
    if cfg.scenario.tasks is not None and cfg.scenario.n_tasks is not None:
        raise ConfigError("scenario: give 'tasks' or 'n_tasks', not both")
    if not cfg.seeds:
        raise ConfigError("seeds: give at least one seed")
    if cfg.strategy.name is None and cfg.strategy.cls is None:
        raise ConfigError("strategy: give a 'name' (see `cltunnel list`) or a 'class' (module:Class)")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(cfg.training, key) < 1:
            raise ConfigError(f"training.{key}: must be at least 1, got {getattr(cfg.training, key)}")
    _validate_ranges(cfg)
    parse_tunnel_start(cfg.analyses.tunnel_start, "analyses.tunnel_start")
    for key, value, valid in (("tunnel_rule", cfg.analyses.tunnel_rule, TUNNEL_RULE_NAMES),
                              ("probe_protocol", cfg.analyses.probe_protocol, PROBE_PROTOCOLS)):
        if value not in valid:
            raise ConfigError(f"analyses.{key}: unknown '{value}'{closest(value, list(valid))}; valid: {', '.join(valid)}")
    for section in cfg.protocol_sections.values():  # each protocol checks its own section
        if hasattr(section, "validate"):
            section.validate(cfg)
    if cfg.training.temperature <= 0:
        raise ConfigError(f"training.temperature: must be positive, got {cfg.training.temperature}")
    _validate_evaluation(cfg.evaluation)
    if cfg.training.capture not in ("auto", "on", "off"):
        raise ConfigError(f"training.capture: auto, on or off, got {cfg.training.capture!r}")


def _validate_evaluation(e: EvaluationConfig) -> None:
    for key, names, valid in (("metrics", e.metrics, EVAL_METRICS), ("loggers", e.loggers, EVAL_LOGGERS)):
        for name in names:
            if name not in valid and not (key == "metrics" and ":" in name):
                hint = closest(name, list(valid))
                raise ConfigError(f"evaluation.{key}: unknown '{name}'{hint}; valid: {', '.join(valid)}"
                                  + (" or 'package.module:factory'" if key == "metrics" else ""))
    if e.loggers and not e.metrics:
        raise ConfigError("evaluation.loggers: given without evaluation.metrics, they would log nothing")


def parse_tunnel_start(value: Any, where: str) -> int | str:
    """The one reading of a tunnel start, wherever it is given (analyses, strategy arguments, a sweep's base):
    ``"auto"`` (found from probes) or a layer number k, the extractor being body layers 1..k (k >= 1; a replay
    point's ``layer`` may be 0, the input). Whether k
    fits the network is checked against the model (:func:`cltunnel.measures.tunnel.check_tunnel_start`)."""
    if value == "auto":
        return "auto"
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit():
        raise ConfigError(f"{where}: 'auto' or a layer number (1..n), got {value!r}")
    return int(text)


def _validate_ranges(cfg: RunConfig) -> None:
    """Values that would train without error and give a meaningless number (a negative width trains to
    chance accuracy; a momentum of 1 never forgets a step): refused before any work."""
    t, d, a = cfg.training, cfg.data, cfg.analyses
    checks = [
        ("model.width", cfg.model.width, cfg.model.width > 0, "must be positive"),
        ("training.lr", t.lr, t.lr >= 0, "must not be negative"),
        ("training.momentum", t.momentum, 0 <= t.momentum < 1, "must be in [0, 1)"),
        ("training.weight_decay", t.weight_decay, t.weight_decay >= 0, "must not be negative"),
        ("training.lr_gamma", t.lr_gamma, t.lr_gamma > 0, "must be positive"),
        ("training.checkpoint_every", t.checkpoint_every, t.checkpoint_every >= 0, "must not be negative"),
        ("training.resume_every", t.resume_every, t.resume_every >= 0, "must not be negative"),
        ("logging.eval_every", cfg.logging.eval_every, cfg.logging.eval_every >= 0, "must not be negative"),
        ("training.lr_milestones", t.lr_milestones, all(m >= 1 for m in t.lr_milestones), "epochs are at least 1"),
        ("training.lr_schedule", t.lr_schedule, t.lr_schedule in ("step", "cosine"), "is step or cosine"),
        ("training.lr_schedule", t.lr_schedule, t.lr_schedule != "cosine" or not t.lr_milestones,
         "cosine takes no lr_milestones (give one or the other)"),
        ("training.capture", t.capture, t.lr_schedule != "cosine" or t.capture != "on",
         "on compiles the step once per learning rate, and cosine changes it every epoch (use off or auto)"),
        ("data.train_per_class", d.train_per_class, d.train_per_class is None or d.train_per_class >= 1,
         "must be at least 1 (or empty: every image)"),
        ("data.test_per_class", d.test_per_class, d.test_per_class is None or d.test_per_class >= 1,
         "must be at least 1 (or empty: every image)"),
        ("analyses.tunnel_threshold", a.tunnel_threshold, a.tunnel_threshold is None or 0 < a.tunnel_threshold <= 1,
         "is a share in (0, 1]"),
        ("analyses.rank_samples", a.rank_samples, a.rank_samples >= 2, "must be at least 2"),
        ("analyses.rank_threshold", a.rank_threshold, 0 < a.rank_threshold < 1, "is a share in (0, 1)"),
        ("analyses.ood_train_per_class", a.ood_train_per_class, a.ood_train_per_class >= 1, "must be at least 1"),
        ("analyses.ood_test_per_class", a.ood_test_per_class, a.ood_test_per_class >= 1, "must be at least 1"),
        ("analyses.block_threshold", a.block_threshold, 0 < a.block_threshold <= 1, "is a CKA in (0, 1]"),
        ("analyses.block_min_layers", a.block_min_layers, a.block_min_layers >= 2, "must be at least 2"),
        ("analyses.block_pc_iterations", a.block_pc_iterations, a.block_pc_iterations >= 1, "must be at least 1"),
        ("analyses.block_pc_tolerance", a.block_pc_tolerance, 0 < a.block_pc_tolerance < 1, "is a share in (0, 1)"),
        ("analyses.block_pooled_stages", a.block_pooled_stages, a.block_pooled_stages >= 1, "must be at least 1"),
    ]
    for where, value, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{where}: {rule}, got {value!r}")
