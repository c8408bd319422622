"""Sweep definitions (YAML) → the explicit list of trial configs, checked before any trial starts.

A sweep file::

    name: demo                      # MLflow experiment and output folder name
    base: {train.epochs: 20}        # flat config keys fixed for every trial
    grid:                           # full cross product; every key is a flat config key
      model.decoder: [linear, multiscale]
      model.mode: [frozen, finetune]
    fewshot:                        # one axis whose values set one or more keys at once
      - {data.patients: 2}
      - {data.fraction: 0.25}
    baselines:                      # cells outside the grid (crossed with fewshot and seeds)
      - {model.backbone: none, model.decoder: unet}
    seeds: [0, 1, 2]
    screen:                         # optional stage 1: learning rate per (backbone, decoder, mode) cell
      search: grid                  # grid: `trials` rates log-spaced in [low, high], the same for every cell;
      low: 1.0e-5                   # optuna: Optuna TPE per cell, `startup` random points first, then
      high: 1.0e-2                  #   model-based, `parallel` of a cell's trials at once (constant liar)
      trials: 8
      scheduler: asha               # early stopping is allowed here only
      set: {train.epochs: 10}       # overrides for screening trials
    resources: {cpus_per_trial: 1, gpus_per_trial: 0, max_concurrent: 2, max_failures: 1}
                                    # frozen_gpus_per_trial: 0.25 packs 4 frozen-backbone trials on one GPU

Unknown keys, wrong types, empty axes and invalid values are refused with one line naming the key.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lasegseg.config import Config, coerce, from_flat, frozen_backbone
from lasegseg.errors import ConfigError, first_line

MAX_TRIALS = 5000
# A sweep file is a page of YAML: these bounds keep a hostile one (a megabyte blob, a "billion laughs" alias bomb
# that expands exponentially once walked) from costing more than a moment before it is refused.
MAX_SPEC_BYTES = 1024**2
MAX_SPEC_NODES = 100_000
# PyYAML's scanner is quadratic in the nesting depth of flow collections ([[[...]]]); real sweeps nest two deep.
MAX_FLOW_DEPTH = 100
TOP_KEYS = {"name", "description", "base", "grid", "fewshot", "baselines", "seeds", "screen", "resources"}
SCREEN_KEYS = {"search", "low", "high", "trials", "scheduler", "set", "grace_period", "startup", "parallel"}
SEARCHES = ("grid", "optuna")
RESOURCE_KEYS = {"cpus_per_trial", "gpus_per_trial", "frozen_gpus_per_trial", "max_concurrent", "max_failures"}
CELL_KEYS = ("model.backbone", "model.registers", "model.decoder", "model.mode")


@dataclass
class Screen:
    """Stage 1: the learning rate of each (backbone, decoder, mode) cell, chosen on validation.

    Args:
        low, high: the range of rates.
        trials: screening trials per cell.
        scheduler: ``asha`` (early stopping, per cell) or ``fifo``.
        grace_period: epochs before ASHA may stop a trial.
        overrides: flat config keys of screening trials (``screen.set``).
        search: ``grid`` (``trials`` rates log-spaced over [low, high], the same for every cell) or ``optuna``
            (Optuna's TPE per cell: ``startup`` random rates, then model-based ones, ``parallel`` of a cell's trials
            at once so that each new rate sees the earlier results).
        startup, parallel: see ``search``.
    """

    low: float
    high: float
    trials: int = 8
    scheduler: str = "asha"
    grace_period: int = 2
    overrides: dict[str, Any] = field(default_factory=dict)
    search: str = "grid"
    startup: int = 3
    parallel: int = 2


@dataclass
class Resources:
    """What each trial asks Ray for, and how many trials run and retry.

    Args:
        cpus_per_trial: CPUs of every trial.
        gpus_per_trial: GPUs of a trial that trains its backbone (finetune, lora, the no-backbone baseline); 0 runs
            the sweep on CPUs.
        frozen_gpus_per_trial: GPU share of a frozen-backbone trial, in (0, 1]; None means gpus_per_trial. A frozen
            trial trains only its decoder and leaves most of a GPU idle, so 0.25 runs four of them on one GPU at
            once. Ignored when gpus_per_trial is 0.
        max_concurrent: trials at once (0: as many as the resources fit).
        max_failures: retries of a failing trial from its last checkpoint.
    """

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    frozen_gpus_per_trial: float | None = None
    max_concurrent: int = 0
    max_failures: int = 1

    def for_trial(self, flat: dict[str, Any]) -> dict[str, float]:
        """The ``{"cpu": …, "gpu": …}`` request of the trial with flat config ``flat``."""
        gpus = self.gpus_per_trial
        if gpus > 0 and frozen_backbone(flat) and self.frozen_gpus_per_trial is not None:
            gpus = self.frozen_gpus_per_trial
        return {"cpu": self.cpus_per_trial, "gpu": gpus}


def gpu_share(value: Any, where: str) -> float:
    """``value`` as a GPU share in (0, 1], else a one-line ConfigError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{where} must be a GPU share in (0, 1] (e.g. 0.25 packs 4 trials per GPU), got {value!r}")
    return float(value)


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    fewshot: list[dict[str, Any]]
    baselines: list[dict[str, Any]]
    seeds: list[int]
    screen: Screen | None
    resources: Resources
    source: str = ""

    def trials(self, lr_by_cell: dict[tuple, float] | None = None) -> list[dict[str, Any]]:
        """Every trial as a full, validated flat config (stage 2 when ``lr_by_cell`` is given)."""
        cells: list[dict[str, Any]] = []
        keys = list(self.grid)
        for values in itertools.product(*(self.grid[k] for k in keys)):
            cells.append(dict(zip(keys, values, strict=True)))
        cells.extend(dict(b) for b in self.baselines)
        out, seen = [], set()
        for cell, shot, seed in itertools.product(cells, self.fewshot or [{}], self.seeds):
            flat = {**Config().to_flat(), **self.base, **cell, **shot, "seed": seed}
            if lr_by_cell is not None:
                flat["optim.lr"] = lr_by_cell[cell_key(flat)]
            cfg = _checked(flat, f"trial {cell} {shot} seed={seed}")
            key = tuple(sorted(cfg.items()))
            if key not in seen:
                seen.add(key)
                out.append(cfg)
        return out

    def screening_cells(self) -> list[dict[str, Any]]:
        """One base config per (backbone, decoder, mode) cell, on all training data, first seed."""
        if self.screen is None:
            return []
        cells = {}
        for flat in self.trials(lr_by_cell=None):
            cells.setdefault(cell_key(flat), flat)
        out = []
        for flat in cells.values():
            screen = {**flat, "data.patients": 0, "data.fraction": 1.0, "seed": self.seeds[0]}
            out.append(_checked({**screen, **self.screen.overrides}, "screen.set"))
        return out


def cell_key(flat: dict[str, Any]) -> tuple:
    """The (backbone, registers, decoder, mode) cell a learning rate is screened for."""
    return tuple(flat[k] for k in CELL_KEYS)


def _checked(flat: dict[str, Any], where: str) -> dict[str, Any]:
    """``flat`` through every check a trial's config passes (the model's rules included), else one line naming the
    trial at fault and why a value it never set can reach it."""
    try:
        return from_flat(flat).to_flat()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc} (base and --set values apply to every cell, baselines included)") from None


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"sweep key '{where}' must be a mapping, got {type(value).__name__}")
    return value


def _flat_map(value: Any, where: str) -> dict[str, Any]:
    out = {}
    for key, item in _mapping(value, where).items():
        try:
            out[str(key)] = coerce(str(key), item)
        except ConfigError as exc:
            raise ConfigError(f"sweep key '{where}': {exc}") from None
    return out


def _unknown(mapping: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(mapping) - allowed)
    if extra:
        raise ConfigError(f"unknown sweep key '{where}{extra[0]}' (valid: {', '.join(sorted(allowed))})")


def parse_spec(raw: dict[str, Any], source: str = "<dict>", overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Check a loaded YAML document and build the sweep; ``overrides`` (``--set``) win over base and grid."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a sweep file must be a YAML mapping")
    _unknown(raw, TOP_KEYS, "")
    name = raw.get("name")
    if (
        not isinstance(name, str)
        or not name.strip()
        or any(c in name for c in "/\\")
        or name.startswith(".")
        or not name.isprintable()
    ):
        raise ConfigError(f"sweep key 'name' must be a plain non-empty name, got {name!r}")
    base = _flat_map(raw.get("base"), "base")
    grid: dict[str, list[Any]] = {}
    for key, values in _mapping(raw.get("grid"), "grid").items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep key 'grid.{key}' must be a non-empty list")
        try:
            grid[str(key)] = [coerce(str(key), v) for v in values]
        except ConfigError as exc:
            raise ConfigError(f"sweep key 'grid.{key}': {exc}") from None
    fewshot = _list_of_maps(raw.get("fewshot"), "fewshot")
    baselines = _list_of_maps(raw.get("baselines"), "baselines")
    seeds = raw.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ConfigError(f"sweep key 'seeds' must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"sweep key 'seeds' has duplicates: {seeds}")
    overrides = dict(overrides or {})
    if "seed" in overrides:  # --set seed=N runs that one seed instead of the list
        seeds = [coerce("seed", overrides.pop("seed"))]
    for key, value in overrides.items():
        value = coerce(key, value)
        base[key] = value
        grid.pop(key, None)
        for items in (fewshot, baselines):
            for item in items:
                item.pop(key, None)
    fewshot = [f for f in fewshot if f] or []
    spec = SweepSpec(
        name=name.strip(),
        base=base,
        grid=grid,
        fewshot=_dedupe(fewshot),
        baselines=baselines,
        seeds=seeds,
        screen=_screen(raw.get("screen"), grid),
        resources=_resources(raw.get("resources")),
        source=source,
    )
    n = _count(spec)
    if n > MAX_TRIALS:
        raise ConfigError(f"{source}: the sweep expands to {n} trials, more than the limit of {MAX_TRIALS}")
    if n == 0:
        raise ConfigError(f"{source}: the sweep has no trials")
    spec.trials()  # every trial config must validate now, before anything starts
    return spec


def _dedupe(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def _count(spec: SweepSpec) -> int:
    cells = 1
    for values in spec.grid.values():
        cells *= len(values)
    return (cells + len(spec.baselines)) * max(1, len(spec.fewshot)) * len(spec.seeds)


def _list_of_maps(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not value:
        raise ConfigError(f"sweep key '{where}' must be a non-empty list of mappings")
    return [_flat_map(item, f"{where}[{i}]") for i, item in enumerate(value)]


def _screen(value: Any, grid: dict[str, list[Any]]) -> Screen | None:
    if value is None:
        return None
    raw = _mapping(value, "screen")
    _unknown(raw, SCREEN_KEYS, "screen.")
    search = raw.get("search", "grid")
    if search not in SEARCHES:
        raise ConfigError(f"sweep key 'screen.search' must be one of {', '.join(SEARCHES)}, got {search!r}")
    if "optim.lr" in grid:
        raise ConfigError(
            "sweep key 'screen': the learning rate is either a grid (grid.optim.lr) or screened, not both"
        )
    try:
        low, high = float(raw["low"]), float(raw["high"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError("sweep keys 'screen.low' and 'screen.high' must be numbers") from None
    if not 0 < low < high:
        raise ConfigError(f"sweep keys 'screen.low/high' must satisfy 0 < low < high, got {low}, {high}")
    trials = raw.get("trials", 8)
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"sweep key 'screen.trials' must be an integer >= 1, got {trials!r}")
    scheduler = raw.get("scheduler", "asha")
    if scheduler not in ("asha", "fifo"):
        raise ConfigError(f"sweep key 'screen.scheduler' must be 'asha' or 'fifo', got {scheduler!r}")
    grace = raw.get("grace_period", 2)
    if not isinstance(grace, int) or grace < 1:
        raise ConfigError(f"sweep key 'screen.grace_period' must be an integer >= 1, got {grace!r}")
    startup, parallel = _positive(raw, "startup", 3), _positive(raw, "parallel", 2)
    if search == "optuna" and startup >= trials:
        raise ConfigError(
            f"sweep key 'screen.startup' ({startup}) must be below screen.trials ({trials}): Optuna's TPE draws its "
            "first `startup` rates at random, so with no trials left after them the search is random"
        )
    overrides = _flat_map(raw.get("set"), "screen.set")
    return Screen(low, high, trials, scheduler, grace, overrides, search, startup, parallel)


def _positive(raw: dict[str, Any], key: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"sweep key 'screen.{key}' must be an integer >= 1, got {value!r}")
    return value


def _resources(value: Any) -> Resources:
    raw = _mapping(value, "resources")
    _unknown(raw, RESOURCE_KEYS, "resources.")
    res = Resources()
    for key, item in raw.items():
        if key == "frozen_gpus_per_trial":
            res.frozen_gpus_per_trial = gpu_share(item, "sweep key 'resources.frozen_gpus_per_trial'")
            continue
        typ = int if key in ("max_concurrent", "max_failures") else float
        if (
            isinstance(item, bool)
            or not isinstance(item, (int, float))
            or (typ is int and not float(item).is_integer())
        ):
            raise ConfigError(f"sweep key 'resources.{key}' expects a {typ.__name__}, got {item!r}")
        if item < 0:
            raise ConfigError(f"sweep key 'resources.{key}' must be >= 0, got {item}")
        setattr(res, key, typ(item))
    return res


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read and check a sweep YAML file."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise ConfigError(f"{path}: sweep file is larger than {MAX_SPEC_BYTES // 1024**2} MiB")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read sweep file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) YAML file") from None
    if _flow_depth(text) > MAX_FLOW_DEPTH:
        raise ConfigError(f"{path}: YAML nested too deeply (more than {MAX_FLOW_DEPTH} levels of [ or {{)")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_node_count(node, path)
        raw = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({first_line(exc)})") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    finally:
        loader.dispose()
    return parse_spec(raw, source=str(path), overrides=overrides)


def _flow_depth(text: str) -> int:
    """Deepest nesting of [ and { (brackets inside strings count too: an upper bound, cheap on normal files)."""
    if text.count("[") + text.count("{") <= MAX_FLOW_DEPTH:
        return 0
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
    return deepest


def _check_node_count(root: Any, path: Path) -> None:
    """Refuse a YAML graph whose aliases expand to more than MAX_SPEC_NODES nodes, or refer to themselves.

    Counted on the composed graph with one size per node (no expansion), iteratively (no recursion limit).
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        if done:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_SPEC_NODES:
                raise ConfigError(f"{path}: YAML expands to more than {MAX_SPEC_NODES} values (alias bomb?)")
            continue
        if id(node) in sizes:
            continue
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise ConfigError(f"{path}: YAML alias refers to itself (line {child.start_mark.line + 1})")
            if id(child) not in sizes:
                stack.append((child, False))
