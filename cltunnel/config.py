"""Scenario YAML -> typed, validated configuration.

Every section is a dataclass; unknown keys are refused with the closest valid name, values are coerced
to the field's type (YAML 1.1 reads ``1e-4`` as a string), and each error names its key path.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cltunnel.errors import CltunnelError


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


@dataclass
class ErosionConfig:
    """Feature erosion (thesis chapter 4): pre-train clean, then keep training on images whose corner square's
    colour encodes the class; optionally clean again (loss of plasticity, against training from scratch)."""

    ratio: float = 1.0  # share of training images that carry the square
    square: int = 4  # side of the square, pixels
    corner: str = "top_left"  # top_left | top_right | bottom_left | bottom_right
    pretrain_epochs: int = 160
    erosion_epochs: int = 160
    relearn_epochs: int = 0  # > 0: a third, clean phase, and a model trained from scratch for as many epochs
    eval_every: int = 1  # epochs between clean/squared test evaluations


REPRESENTATION_KINDS = ("D", "AE", "VAE")


@dataclass
class RepresentationsConfig:
    """``representations:``: discriminative vs generative (AE, VAE) representations (thesis chapter 3)."""

    models: list[str] = field(default_factory=lambda: list(REPRESENTATION_KINDS))
    bottleneck: int | None = None  # default: 8, or 128 for CIFAR-10
    epochs: int = 10  # per task
    lr: float = 1e-3  # Adam
    batch_size: int = 128
    classifier_epochs: int = 30


SYNTHETIC_SOURCES = ("synthetic", "real", "generative")
SYNTHETIC_LEARNERS = ("conv", "mlp")


@dataclass
class SyntheticConfig:
    """``synthetic:``: meta-learned synthetic data (thesis chapter 2). Defaults are the CPU-minutes budget;
    the thesis trained G far longer."""

    meta_steps: int = 300
    meta_lr: float = 3e-4  # Adam on G and the learner's lr, momentum (200 steps on MNIST: 1e-2 diverged, 1e-4 slower)
    meta_clip: float = 1.0  # largest meta-gradient norm (0: no clipping)
    samples_per_class: int = 250
    inner_steps: int = 5  # per task
    batch_per_class: int = 20  # batch 40 for two classes per task
    latent: int = 32
    generator_hidden: int = 256
    learner_channels: int = 8  # conv learner: c and 2c channels
    mlp_hidden: int = 128
    init_lr: float = 0.05
    init_momentum: float = 0.5
    meta_batch: int = 500  # real training images (all classes) in S's loss after the sequence
    test_per_class: int = 200  # real test images per class in the evaluation batch (0: the whole test set)
    eval_learners: int = 5  # fresh learners per (source, learner, steps) at evaluation
    eval_inner_steps: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20])
    sources: list[str] = field(default_factory=lambda: list(SYNTHETIC_SOURCES))
    learners: list[str] = field(default_factory=lambda: list(SYNTHETIC_LEARNERS))
    cvae_epochs: int = 5
    checkpoint_every: int = 50


NARROW_RESNET_PRESETS = ("mlp", "near_mlp", "ode", "resnet", "augmented")
NARROW_RESNET_TASKS = {"x2": 1, "disk_ring": 2, "xor": 2}  # task -> input dimension
NARROW_RESNET_REGIME_KEYS = ("name", "eps", "delta", "width", "depths")  # depths: this regime's own
# What narrow_resnet.task_settings may set for one task (the rest is the section's).
NARROW_RESNET_TASK_KEYS = ("depths", "regimes", "epochs", "batch_size", "lr", "points", "retries", "batchnorm_axis",
                           "keep_best")
NARROW_RESNET_ACTIVATIONS = ("tanh", "relu")


@dataclass
class NarrowResnetConfig:
    """``narrow_resnet:``: toy input-output maps of narrow ResNets (Kuehn, Kuntz & Wöhrer 2026), blocks
    x -> eps*x + delta*act(BN(Wx + b)) after an input layer. Defaults: the authors' settings at CPU-minutes size."""

    tasks: list[str] = field(default_factory=lambda: list(NARROW_RESNET_TASKS))
    regimes: list[Any] = field(default_factory=lambda: ["mlp", "ode", "resnet", "augmented"])  # a preset or {name, eps, delta, width}
    depths: list[int] = field(default_factory=lambda: [2, 6, 20])  # residual blocks L
    width: int | None = None  # residual width of every regime but `augmented`; default: the task's input dimension
    augmented_width: int | None = None  # width of the `augmented` preset; default: input dimension + 1
    activation: str = "tanh"  # tanh (the authors' figures) | relu
    batchnorm: list[str] = field(default_factory=lambda: ["disk_ring", "xor"])  # tasks with BN in the blocks (authors: 2-D)
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.01  # Adam
    points: int = 2000  # data points per task (x2: training points; its error is on a grid of [-1, 1])
    test_share: float = 0.3  # share of the 2-D points held out for test accuracy
    box: float = 3.0  # the box [-box, box]^d (data in [-1, 1]^d) searched for critical points and unbounded regions
    grid: int = 241  # grid points per axis of that box
    # The authors' protocol (twoehrer/Narrow_ResNet_Constraints; scenarios/narrow_resnet_authors.yaml). The
    # defaults keep the settings above as they were.
    input_layer: list[str] | None = None  # tasks with an input layer act(Vx + c); empty: every task (authors: 2-D only)
    batchnorm_axis: list[bool] | None = None  # set: every regime once per value (overrides `batchnorm`)
    retries: int = 1  # fresh initialisations tried until `accept` is reached (authors: up to 10)
    accept: dict[str, float] = field(default_factory=dict)  # task -> score to reach: 2-D test accuracy, x2 1 - MSE
    keep_best: bool = False  # the authors' rule: after an epoch that does not improve the test score, the best state
    standardise: bool = False  # 2-D points standardised per axis (the authors' StandardScaler)
    task_settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> its own NARROW_RESNET_TASK_KEYS


# The sections that select a protocol other than the task sequence (cltunnel.experiments.registry).
PROTOCOL_SECTIONS = ("erosion", "representations", "synthetic", "narrow_resnet")
# Sections that were free-form mappings before cltunnel 0.2: their fingerprint counts only the keys that
# differ from the defaults, as the mapping did, so runs made then still resume.
SPARSE_FINGERPRINT = {"representations": RepresentationsConfig, "synthetic": SyntheticConfig}


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
    erosion: ErosionConfig | None = None  # set: a feature-erosion run instead of a task sequence
    representations: RepresentationsConfig | None = None  # set: D/AE/VAE representations (experiments.representations)
    synthetic: SyntheticConfig | None = None  # set: meta-learned synthetic data (experiments.synthetic)
    narrow_resnet: NarrowResnetConfig | None = None  # set: narrow ResNets on toy maps (experiments.narrow_resnet)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    expect: dict[str, Any] = field(default_factory=dict)  # bands [low, high] the run checks (cltunnel.expectations)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
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
        for section in PROTOCOL_SECTIONS:  # runs from before these sections keep their fingerprint
            if d[section] is None:
                d.pop(section)
            elif section in SPARSE_FINGERPRINT:
                defaults = dataclasses.asdict(SPARSE_FINGERPRINT[section]())
                d[section] = {k: v for k, v in d[section].items() if v != defaults[k]}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# Names users bring from other frameworks, suggested when spelling alone finds nothing close.
SYNONYMS = {"learning_rate": "lr", "wd": "weight_decay", "epochs_per_task": "epochs", "batch": "batch_size",
            "dataset": "data", "arch": "model", "architecture": "model", "seed": "seeds", "classes": "tasks",
            "n_experiences": "n_tasks", "per_exp_classes": "tasks", "fixed_class_order": "class_order"}


def _closest(key: str, valid: list[str]) -> str:
    if SYNONYMS.get(key) in valid:
        return f" (did you mean '{SYNONYMS[key]}'?)"
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, hint: Any, path: str) -> Any:
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
        return _coerce(value, inner[0], path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
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


def _build(cls: type, raw: dict[str, Any], path: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    aliases = {"class": "cls"} if cls is StrategyConfig else {}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        attr = aliases.get(key, key)
        where = f"{path}.{key}" if path else str(key)
        if attr not in names or attr in aliases.values() and key not in aliases:
            valid = [k for k in names if k not in aliases.values()] + list(aliases)
            raise ConfigError(f"unknown key '{where}'{_closest(str(key), valid)}; valid keys here: {', '.join(valid)}")
        kwargs[attr] = _coerce(value, hints[attr], where)
    return cls(**kwargs)


def _normalise_strategy(raw: dict[str, Any]) -> None:
    """Accept ``strategy: ewc`` as shorthand for ``strategy: {name: ewc}``; a class overrides the name."""
    strategy = raw.get("strategy")
    if isinstance(strategy, str):
        raw["strategy"] = {"name": strategy}
    elif isinstance(strategy, dict) and "class" in strategy and "name" not in strategy:
        raw["strategy"] = {**strategy, "name": None}


def parse_config(raw: dict[str, Any], default_name: str = "scenario") -> RunConfig:
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
    if cfg.scenario.tasks is None and cfg.scenario.n_tasks is None and cfg.narrow_resnet is None:  # toy data only
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
            raise ConfigError(f"analyses.{key}: unknown '{value}'{_closest(value, list(valid))}; valid: {', '.join(valid)}")
    if cfg.erosion is not None:
        _validate_erosion(cfg)
    if cfg.representations is not None:
        _validate_representations(cfg.representations)
    if cfg.synthetic is not None:
        _validate_synthetic(cfg.synthetic)
    if cfg.narrow_resnet is not None:
        _validate_narrow_resnet(cfg.narrow_resnet)
    if cfg.training.temperature <= 0:
        raise ConfigError(f"training.temperature: must be positive, got {cfg.training.temperature}")
    _validate_evaluation(cfg.evaluation)
    if cfg.training.capture not in ("auto", "on", "off"):
        raise ConfigError(f"training.capture: auto, on or off, got {cfg.training.capture!r}")


def _validate_evaluation(e: EvaluationConfig) -> None:
    for key, names, valid in (("metrics", e.metrics, EVAL_METRICS), ("loggers", e.loggers, EVAL_LOGGERS)):
        for name in names:
            if name not in valid and not (key == "metrics" and ":" in name):
                hint = _closest(name, list(valid))
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


CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


def _validate_erosion(cfg: RunConfig) -> None:
    e = cfg.erosion
    if not 0.0 <= e.ratio <= 1.0:
        raise ConfigError(f"erosion.ratio: a share of training images in [0, 1], got {e.ratio}")
    if e.corner not in CORNERS:
        raise ConfigError(f"erosion.corner: '{e.corner}' is not one of {', '.join(CORNERS)}")
    if e.square < 1 or e.pretrain_epochs < 0 or e.erosion_epochs < 1 or e.relearn_epochs < 0 or e.eval_every < 1:
        raise ConfigError("erosion: square, erosion_epochs and eval_every must be at least 1; epochs not negative")
    if cfg.scenario.tasks is not None and len(cfg.scenario.tasks) != 1 or cfg.scenario.n_tasks not in (None, 1):
        raise ConfigError("erosion: runs on one task holding every class (scenario: {tasks: [10]}), "
                          f"got scenario.tasks={cfg.scenario.tasks}, n_tasks={cfg.scenario.n_tasks}")


def _validate_representations(rc: RepresentationsConfig) -> None:
    bad = [m for m in rc.models if m not in REPRESENTATION_KINDS]
    if bad:
        raise ConfigError(f"representations.models: unknown {bad}; valid: {', '.join(REPRESENTATION_KINDS)}")


def _validate_synthetic(sc: SyntheticConfig) -> None:
    for key, valid in (("sources", SYNTHETIC_SOURCES), ("learners", SYNTHETIC_LEARNERS)):
        bad = [v for v in getattr(sc, key) if v not in valid]
        if bad:
            raise ConfigError(f"synthetic.{key}: unknown {bad}; valid: {', '.join(valid)}")
    values = {k: getattr(sc, k) for k in ("samples_per_class", "inner_steps", "batch_per_class", "meta_batch",
                                           "eval_learners", "checkpoint_every")}
    values["eval_inner_steps"] = min(sc.eval_inner_steps, default=1)
    bad = [k for k, v in values.items() if v < 1] + [k for k in ("meta_steps", "test_per_class") if getattr(sc, k) < 0]
    if bad:
        raise ConfigError(f"synthetic: {', '.join(bad)} must be positive (meta_steps, test_per_class: not negative)")


def _validate_narrow_resnet(nc: NarrowResnetConfig) -> None:
    for key, values, valid in (("tasks", nc.tasks, list(NARROW_RESNET_TASKS)), ("batchnorm", nc.batchnorm, list(NARROW_RESNET_TASKS))):
        bad = [v for v in values if v not in valid]
        if bad or (key == "tasks" and not values):
            raise ConfigError(f"narrow_resnet.{key}: unknown {bad}; valid: {', '.join(valid)}" if bad else
                              f"narrow_resnet.tasks: give at least one of {', '.join(valid)}")
    if nc.activation not in NARROW_RESNET_ACTIVATIONS:
        raise ConfigError(f"narrow_resnet.activation: '{nc.activation}' is not one of {', '.join(NARROW_RESNET_ACTIVATIONS)}")
    names = [_narrow_resnet_regime(r, f"narrow_resnet.regimes[{i}]") for i, r in enumerate(nc.regimes)]
    if not names or len(set(names)) < len(names):
        raise ConfigError(f"narrow_resnet.regimes: give one or more regimes with distinct names, got {names}")
    dims = max(NARROW_RESNET_TASKS[t] for t in nc.tasks)
    checks = [("depths", nc.depths, bool(nc.depths) and min(nc.depths) >= 1, "at least one depth, each at least 1"),
              ("width", nc.width, nc.width is None or nc.width >= 1, "must be at least 1 (or empty: the input dimension)"),
              ("augmented_width", nc.augmented_width, nc.augmented_width is None or nc.augmented_width > dims,
               f"must be above the tasks' input dimension ({dims})"),
              ("lr", nc.lr, nc.lr > 0, "must be positive"), ("test_share", nc.test_share, 0 < nc.test_share < 1,
                                                             "is a share in (0, 1)"),
              ("box", nc.box, nc.box > 1, "must be above 1 (the data's extent)"), ("grid", nc.grid, nc.grid >= 5,
                                                                                   "must be at least 5")]
    checks += [(k, getattr(nc, k), getattr(nc, k) >= 1, "must be at least 1") for k in ("epochs", "batch_size")]
    checks += [("points", nc.points, nc.points >= 20, "must be at least 20")]
    checks += [("retries", nc.retries, nc.retries >= 1, "must be at least 1")]
    for key, value, ok, rule in checks:
        if not ok:
            raise ConfigError(f"narrow_resnet.{key}: {rule}, got {value!r}")
    for key in ("input_layer",):
        bad = [v for v in (getattr(nc, key) or []) if v not in NARROW_RESNET_TASKS]
        if bad:
            raise ConfigError(f"narrow_resnet.{key}: unknown {bad}; valid: {', '.join(NARROW_RESNET_TASKS)}")
    if nc.batchnorm_axis is not None and (not nc.batchnorm_axis or any(not isinstance(v, bool) for v in nc.batchnorm_axis)
                                          or len(set(nc.batchnorm_axis)) < len(nc.batchnorm_axis)):
        raise ConfigError(f"narrow_resnet.batchnorm_axis: distinct true/false values, got {nc.batchnorm_axis!r}")
    for task, score in nc.accept.items():
        if task not in NARROW_RESNET_TASKS:
            raise ConfigError(f"narrow_resnet.accept: unknown task '{task}'; valid: {', '.join(NARROW_RESNET_TASKS)}")
        if not isinstance(score, (int, float)) or not 0 < score <= 1:
            raise ConfigError(f"narrow_resnet.accept.{task}: a score in (0, 1] (test accuracy; x2: 1 - MSE), got {score!r}")
    for task, over in nc.task_settings.items():
        if task not in NARROW_RESNET_TASKS or not isinstance(over, dict):
            raise ConfigError(f"narrow_resnet.task_settings: '{task}' is not a task ({', '.join(NARROW_RESNET_TASKS)}) "
                              "with a mapping of settings")
        unknown = [k for k in over if k not in NARROW_RESNET_TASK_KEYS]
        if unknown:
            raise ConfigError(f"narrow_resnet.task_settings.{task}: unknown {unknown}; valid: {', '.join(NARROW_RESNET_TASK_KEYS)}")
        if over:
            try:
                _validate_narrow_resnet(dataclasses.replace(nc, tasks=[task], task_settings={}, **over))
            except ConfigError as exc:
                raise ConfigError(str(exc).replace("narrow_resnet.", f"narrow_resnet.task_settings.{task}.", 1)) from None
    for task in nc.tasks:
        tc = dataclasses.replace(nc, **nc.task_settings.get(task, {}))
        if nc.input_layer is not None and task not in nc.input_layer:
            dims = NARROW_RESNET_TASKS[task]
            wide = [_narrow_resnet_regime(r, "") for r in tc.regimes
                    if r == "augmented" or (isinstance(r, dict) and int(r.get("width", tc.width or dims)) != dims)
                    or (isinstance(r, str) and (tc.width or dims) != dims)]
            if wide:
                raise ConfigError(f"narrow_resnet.input_layer: {task} has no input layer, so its regimes keep the input's "
                                  f"width {dims}; {wide} do not")


def _narrow_resnet_regime(spec: Any, where: str) -> str:
    """A regime is a preset name or a mapping {name, eps, delta, width}; returns its name (checked here, built by
    cltunnel.experiments.narrow_resnet)."""
    if isinstance(spec, str):
        if spec not in NARROW_RESNET_PRESETS:
            raise ConfigError(f"{where}: unknown preset '{spec}'{_closest(spec, list(NARROW_RESNET_PRESETS))}; valid: "
                              f"{', '.join(NARROW_RESNET_PRESETS)} or a mapping {{eps, delta}}")
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: a preset ({', '.join(NARROW_RESNET_PRESETS)}) or a mapping {{eps, delta}}, got {spec!r}")
    unknown = [k for k in spec if k not in NARROW_RESNET_REGIME_KEYS]
    if unknown or "eps" not in spec or "delta" not in spec:
        raise ConfigError(f"{where}: give eps and delta (optional: name, width); got keys {sorted(map(str, spec))}")
    if "depths" in spec and (not isinstance(spec["depths"], list) or not spec["depths"]
                             or any(not isinstance(d, int) or d < 1 for d in spec["depths"])):
        raise ConfigError(f"{where}.depths: a list of depths, each at least 1, got {spec['depths']!r}")
    for key in ("eps", "delta", "width"):
        if key == "delta" and isinstance(spec[key], str) and re.fullmatch(r"\s*[0-9.]+\s*/\s*L\s*", spec[key]):
            continue  # "2/L": delta = 2 / depth (the authors' ODE regime)
        if key in spec:
            value = _coerce(spec[key], int if key == "width" else float, f"{where}.{key}")
            if value < (1 if key == "width" else 0):
                raise ConfigError(f"{where}.{key}: " + ("must be at least 1" if key == "width" else "must not be negative")
                                  + f", got {spec[key]!r}")
    delta = spec["delta"] if isinstance(spec["delta"], str) else f"{float(spec['delta']):g}"
    return str(spec.get("name", f"eps={float(spec['eps']):g} delta={delta}"))


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
    ]
    for where, value, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{where}: {rule}, got {value!r}")
