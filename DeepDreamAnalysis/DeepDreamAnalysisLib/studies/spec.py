"""The study file: which models, images, seed points, restarts, dream methods and features (docs/studies.md).

A study file is YAML (``.yaml``/``.yml``, needs PyYAML) or JSON. Relative paths are relative to the
study file's folder. :func:`load_study` reads and checks it (unknown keys, missing files, seed
points outside their image, duplicate runs) and :func:`expand_runs` lists its runs, each keyed by a
hash of the model file, the image file, the seed point, the restart, the method and the settings,
so a study resumes where it stopped.

Seed points are voxel indices ``[i, j, k]`` (0-based, i along the image's first axis as in the
``run`` command). Instead of a list, ``seed_rule: {mask: FILE, count: N, random_seed: S, label: L}``
picks ``N`` voxels of the mask (label ``L``, default any nonzero) at random with numpy's
``default_rng(S)``, always the same ones for the same file and rule.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import AnalysisConfig, DreamConfig, FeatureConfig, dream_settings
from ..errors import ConfigError

TOP_KEYS = {"name", "models", "images", "restarts", "restart_noise_std", "methods", "dream", "features", "custom_features",
            "feature_backend", "feature_every", "bin_width", "reference", "retries", "snapshot_every",
            "workers", "gpus_per_run", "keep_flagged", "batch"}
MODEL_KEYS = {"name", "path", "card", "group"}
IMAGE_KEYS = {"name", "path", "seeds", "seed_rule"}
RULE_KEYS = {"mask", "count", "random_seed", "label"}
DREAM_KEYS = {f.name for f in dataclasses.fields(DreamConfig)} - {"method"}  # methods: the top-level list


class StudySpecError(ConfigError):
    """The study file is wrong; the message names the entry and the fix."""


@dataclass
class ModelEntry:
    name: str
    path: Path
    card: Path | None = None
    group: str = ""
    """Models of one group are the same network trained with different seeds: pooled together."""


@dataclass
class ImageEntry:
    name: str
    path: Path
    seeds: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class StudySpec:
    """A checked study file. ``source`` is the file it came from (None when built in Python)."""

    name: str
    models: list[ModelEntry]
    images: list[ImageEntry]
    restarts: int = 1
    restart_noise_std: float = 10.0
    methods: list[str] = field(default_factory=lambda: ["default"])
    dream: dict[str, Any] = field(default_factory=dict)
    features: list[str] | None = None
    feature_backend: str = "auto"
    feature_every: int = 1
    bin_width: float = 25.0
    reference: Path | None = None
    retries: int = 2
    snapshot_every: int = 10
    workers: int | None = None
    gpus_per_run: float | None = None
    keep_flagged: bool = False
    """Rank runs with quality flags too (docs/quality-flags.md); by default they are left out of the ranking."""
    custom_features: dict[str, str] = field(default_factory=dict)
    """Custom features (name -> ``module:function`` or ``/abs/path/file.py:function``): user code,
    loaded only once allowed (:func:`allow_custom_features`); never imported by :func:`load_study`."""
    custom_allowed: bool = False
    """Set by :func:`allow_custom_features`: a worker loads the custom features only when this is True."""
    custom_sources: dict[str, bytes] = field(default_factory=dict, repr=False)
    """The bytes of each custom feature file (by absolute path), shipped to the workers with the study."""
    batch: int = 4
    """At most this many runs of one model, image and method (restarts, seed points) go through the
    network as one batch, in one task (docs/studies.md, "Batched restarts"); 1 runs each alone."""
    source: Path | None = None
    raw: dict = field(default_factory=dict)
    inputs: list[Path] = field(default_factory=list)
    """Every file the study reads (the study file, models, cards, images, masks, reference): the study
    folder may not hold one of them nor lie inside one (:func:`~..outputs.check_output_folder`)."""
    hashes: dict = field(default_factory=dict, repr=False)
    """sha256 of each input file, by path (filled by :func:`expand_runs`)."""

    def fingerprint(self) -> str:
        """Hash of the study's content (paths resolved): equal for the same study file."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: model x image x seed point x restart x method."""

    key: str
    model: str
    group: str
    image: str
    seed: tuple[int, int, int]
    seed_index: int
    restart: int
    method: str

    def label(self) -> str:
        return f"{self.model} / {self.image} seed {self.seed_index} {list(self.seed)} / restart {self.restart} / {self.method}"


def _fail(where: str, problem: str, fix: str) -> StudySpecError:
    return StudySpecError(f"Study file, {where}: {problem}. {fix}")


def _unknown(d: dict, allowed: set, where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise _fail(where, f"unknown key{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}",
                    f"Allowed keys: {', '.join(sorted(allowed))} (docs/studies.md).")


MAX_STUDY_BYTES = 16 << 20
MAX_STUDY_ENTRIES = 200_000
"""A study file may hold at most this many values once YAML aliases are expanded (a "billion laughs"
file is refused instead of filling memory)."""


def read_study_file(path) -> dict:
    """The study file as a dict (YAML or JSON by extension), size-, depth- and alias-capped."""
    from ..inputs import MAX_JSON_DEPTH, _max_depth, check_path, loads, nesting_depth

    p = check_path(path, "study file", StudySpecError,
                   missing=f"Study file not found: {Path(path).expanduser()}. Give the path of a .yaml or .json "
                           "study file (docs/studies.md).")
    if p.stat().st_size > MAX_STUDY_BYTES:
        raise StudySpecError(f"The study file {p} is {p.stat().st_size / 2**20:.1f} MiB; a study file is at most "
                             f"{MAX_STUDY_BYTES >> 20} MiB. Check that this is the right file.")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StudySpecError(f"The study file {p} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise StudySpecError("Reading a YAML study file needs PyYAML: pip install 'deepdream-analysis[study]' "
                                 "(or write the study file as JSON).") from None
        if _max_depth(text) > MAX_JSON_DEPTH:  # flow-style nesting, before the recursive parser sees it
            raise StudySpecError(f"The study file {p} is nested more than {MAX_JSON_DEPTH} levels deep. Check that "
                                 "this is the right file.")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise StudySpecError(f"{p} is not valid YAML: {exc}") from None
        except RecursionError:
            raise StudySpecError(f"The study file {p} is nested too deeply; at most {MAX_JSON_DEPTH} levels are "
                                 "accepted.") from None
        if _too_many_values(data):
            raise StudySpecError(f"The study file {p} expands to more than {MAX_STUDY_ENTRIES} values (YAML aliases "
                                 "repeating entries); a study file lists its models, images and settings once.")
        if nesting_depth(data) > MAX_JSON_DEPTH:
            raise StudySpecError(f"The study file {p} is nested more than {MAX_JSON_DEPTH} levels deep. Check that "
                                 "this is the right file.")
    else:
        try:
            data = loads(text, f"The study file {p}", StudySpecError)
        except StudySpecError as exc:
            hint = " YAML files need the .yaml extension." if "is not valid JSON" in str(exc) else ""
            raise StudySpecError(f"{exc}{hint}") from None
    if not isinstance(data, dict):
        raise StudySpecError(f"{p}: a study file is a mapping with models, images, ... (docs/studies.md).")
    return data


def _too_many_values(data) -> bool:
    """True when ``data`` holds more than :data:`MAX_STUDY_ENTRIES` values, counting shared ones each time."""
    count, stack = 0, [data]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_STUDY_ENTRIES:
            return True
        if isinstance(node, dict):
            stack.extend(node.values())
            stack.extend(node.keys())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def load_study(path_or_dict, base: str | Path | None = None) -> StudySpec:
    """Read and check a study file (path) or study dict (paths relative to ``base``, default cwd)."""
    if isinstance(path_or_dict, (str, Path)):
        source = Path(path_or_dict).expanduser().resolve()
        data = read_study_file(source)
        base = source.parent
    else:
        source = None
        data = copy.deepcopy(path_or_dict)
        base = Path(base or ".").resolve()
    _unknown(data, TOP_KEYS, "top level")

    def resolve(p, where) -> Path:
        if not isinstance(p, str) or not p:
            raise _fail(where, f"expected a file path, got {p!r}", "Write the path as a string.")
        q = Path(p).expanduser()
        q = q if q.is_absolute() else (base / q)
        if not q.exists():
            raise _fail(where, f"{q} does not exist", "Fix the path (relative paths start at the study file's folder).")
        return q.resolve()

    models = []
    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise _fail("models", "no models", "List at least one model: models: [{name: a, path: a.pt}].")
    for n, m in enumerate(raw_models):
        where = f"models[{n}]"
        if isinstance(m, str):
            m = {"path": m}
        if not isinstance(m, dict):
            raise _fail(where, f"expected a mapping, got {m!r}", "Write {name: NAME, path: FILE}.")
        _unknown(m, MODEL_KEYS, where)
        path = resolve(m.get("path"), where + ".path")
        card = resolve(m["card"], where + ".card") if m.get("card") else None
        name = str(m.get("name") or path.stem)
        models.append(ModelEntry(name, path, card, str(m.get("group") or name)))
    _no_duplicates([m.name for m in models], "models", "model names")

    images, masks = [], []
    raw_images = data.get("images")
    if not isinstance(raw_images, list) or not raw_images:
        raise _fail("images", "no images", "List at least one image with seed points: images: [{path: ct.nii.gz, seeds: [[i, j, k]]}].")
    for n, im in enumerate(raw_images):
        where = f"images[{n}]"
        if not isinstance(im, dict):
            raise _fail(where, f"expected a mapping, got {im!r}", "Write {name: NAME, path: FILE, seeds: [[i, j, k]]}.")
        _unknown(im, IMAGE_KEYS, where)
        path = resolve(im.get("path"), where + ".path")
        name = str(im.get("name") or path.name.split(".")[0])
        if ("seeds" in im) == ("seed_rule" in im):
            raise _fail(where, "give either seeds or seed_rule", "seeds: [[i, j, k], ...] or seed_rule: {mask: FILE, count: N}.")
        if "seeds" in im:
            seeds = [_seed(s, f"{where}.seeds[{k}]") for k, s in enumerate(im["seeds"] or [])]
            if not seeds:
                raise _fail(where + ".seeds", "empty", "Give at least one seed point [i, j, k].")
        else:
            rule = im["seed_rule"]
            if not isinstance(rule, dict):
                raise _fail(where + ".seed_rule", f"expected a mapping, got {rule!r}", "Write {mask: FILE, count: N}.")
            _unknown(rule, RULE_KEYS, where + ".seed_rule")
            mask = resolve(rule.get("mask"), where + ".seed_rule.mask")
            masks.append(mask)
            seeds = seeds_from_rule(mask, rule, where + ".seed_rule")
        _check_seeds_inside(path, seeds, where)
        _no_duplicates([str(list(s)) for s in seeds], where + ".seeds", "seed points")
        images.append(ImageEntry(name, path, seeds))
    _no_duplicates([i.name for i in images], "images", "image names")

    dream = data.get("dream") or {}
    if not isinstance(dream, dict):
        raise _fail("dream", f"expected a mapping, got {dream!r}", "Write dream: {iterations: 100, step: 400}.")
    _unknown(dream, DREAM_KEYS, "dream")
    methods = data.get("methods", ["default"])
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise _fail("methods", f"expected a list of method names, got {methods!r}", "Write methods: [paper].")
    _no_duplicates(methods, "methods", "methods")
    _check_methods(methods)
    restarts = data.get("restarts", 1)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise _fail("restarts", f"must be a positive integer, got {restarts!r}", "Write restarts: 2.")
    retries = data.get("retries", 2)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
        raise _fail("retries", f"must be an integer from 0 to 10, got {retries!r}", "Write retries: 2.")
    batch = data.get("batch", 4)
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 256:
        raise _fail("batch", f"must be an integer from 1 to 256, got {batch!r}",
                    "Write batch: 4 (runs per batch through the network), or batch: 1 to run each alone.")
    features = data.get("features")
    if features is not None and (not isinstance(features, list) or not all(isinstance(f, str) for f in features)):
        raise _fail("features", f"expected a list of feature names, got {features!r}",
                    "Write features: [firstorder_Mean, shape_Sphericity] (deepdream-analysis features lists them).")
    reference = resolve(data["reference"], "reference") if data.get("reference") else None
    custom = _custom_features(data.get("custom_features"), base)
    raw = dict(data)
    raw["models"] = [dataclasses.asdict(m) for m in models]
    raw["images"] = [dataclasses.asdict(i) for i in images]
    raw["reference"] = str(reference) if reference else None
    spec = StudySpec(
        name=str(data.get("name") or (source.stem if source else "study")), models=models, images=images,
        restarts=restarts, restart_noise_std=float(data.get("restart_noise_std", 10.0)), methods=list(methods),
        dream=dict(dream), features=features, feature_backend=str(data.get("feature_backend", "auto")),
        feature_every=int(data.get("feature_every", 1)), bin_width=float(data.get("bin_width", 25.0)),
        reference=reference, retries=retries, snapshot_every=int(data.get("snapshot_every", 10)),
        workers=data.get("workers"), gpus_per_run=data.get("gpus_per_run"),
        keep_flagged=bool(data.get("keep_flagged", False)), custom_features=custom, batch=batch, source=source, raw=raw)
    spec.inputs = [p for p in [source, *(m.path for m in models), *(m.card for m in models), *(i.path for i in images),
                               *masks, reference, *custom_feature_files(spec).values()] if p is not None]
    # every run's configuration must be valid before anything starts
    analysis_config(spec, spec.methods[0], None).validate()
    expand_runs(spec)  # duplicate runs are refused here, before anything starts
    return spec


def _custom_features(value, base: Path) -> dict[str, str]:
    """``custom_features: {NAME: module:function | path/file.py:function}``, checked without importing
    anything; file paths made absolute (relative to the study file's folder)."""
    from ..features.custom import check_name
    from ..errors import FeatureError

    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail("custom_features", f"expected a mapping of names to functions, got {value!r}",
                    "Write custom_features: {my_feature: my_features.py:my_function}.")
    out = {}
    for name, target in value.items():
        where = f"custom_features.{name}"
        try:
            name = check_name(name)
        except FeatureError as exc:
            raise StudySpecError(f"Study file, {where}: {exc}") from None
        if not isinstance(target, str) or ":" not in target or not target.rpartition(":")[0] \
                or not target.rpartition(":")[2]:
            raise _fail(where, f"expected 'module:function' or 'path/to/file.py:function', got {target!r}",
                        "Write my_features.py:my_function (docs/features.md).")
        module, _, func = target.rpartition(":")
        if _is_file_target(module):
            path = Path(module).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise _fail(where, f"{path} does not exist", "Fix the path (relative paths start at the study file's "
                            "folder).")
            target = f"{path.resolve()}:{func}"
        out[name] = target
    return out


def _is_file_target(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def custom_feature_files(spec: StudySpec) -> dict[str, Path]:
    """The Python files of the study's custom features, by feature name (module targets have none)."""
    out = {}
    for name, target in spec.custom_features.items():
        module = target.rpartition(":")[0]
        if _is_file_target(module):
            out[name] = Path(module)
    return out


def allow_custom_features(spec: StudySpec, allowed=False) -> StudySpec:
    """Allow the study's custom features to be loaded (they are user code: SECURITY.md).

    ``allowed``: True (``--allow-custom-features``: every custom feature the study file names), or a
    mapping name -> target (``--custom-feature NAME=TARGET``, file paths relative to the current
    folder) that must name each of the study's custom features with the same function. Anything
    else raises :class:`StudySpecError` naming the code the study would load and the opt-in, before
    anything is imported. Reads each feature file (shipped to the workers with the study)."""
    given = {}
    if isinstance(allowed, dict):
        given = _custom_features(allowed, Path.cwd()) if allowed else {}
        extra = sorted(set(given) - set(spec.custom_features))
        if extra:
            raise StudySpecError(
                f"--custom-feature {extra[0]}=...: the study file has no custom feature {extra[0]!r}. Name it under "
                "custom_features in the study file (the study file records everything its runs compute).")
    if not spec.custom_features:
        spec.custom_allowed = True
        return spec
    if allowed is not True:
        missing = [n for n, t in spec.custom_features.items() if given.get(n) != t]
        if missing:
            shown = ", ".join(f"{n} = {spec.custom_features[n]}" for n in missing)
            flags = " ".join(f"--custom-feature {n}={spec.custom_features[n]}" for n in missing)
            raise StudySpecError(
                f"The study file names custom features ({shown}): Python code that would run on every worker. "
                f"Custom features are loaded only when you ask for them. If you wrote this study file or trust that "
                f"code, run again with {flags} (or --allow-custom-features for every custom feature the file names; "
                "Python: run_study(..., allow_custom_features=True)); otherwise remove custom_features (SECURITY.md).")
    for name, path in custom_feature_files(spec).items():
        try:
            spec.custom_sources[str(path)] = path.read_bytes()
        except OSError as exc:
            raise _fail(f"custom_features.{name}", f"{path} cannot be read ({exc.strerror or exc})",
                        "Check the file.") from None
    spec.custom_allowed = True
    return spec


def _check_methods(methods: list[str]) -> None:
    """Each method must be one the dream loop knows (``paper`` only before the dream-methods registry)."""
    try:
        from ..dreaming import parse_method  # type: ignore[attr-defined]
    except ImportError:
        bad = [m for m in methods if m not in ("default", "paper")]
        if bad:
            raise _fail("methods", f"unknown method(s) {', '.join(bad)}", "This version has the paper's loop only: methods: [paper].")
        return
    for m in methods:
        if m == "default":
            continue
        try:
            parse_method(m)
        except ConfigError as exc:
            raise _fail("methods", f"{m!r}: {exc}", "Use the names `deepdream-analysis run --help` lists under --method.") from None


def _seed(s, where) -> tuple[int, int, int]:
    if (not isinstance(s, (list, tuple)) or len(s) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in s)):
        raise _fail(where, f"a seed point is three integers [i, j, k], got {s!r}", "Write [i, j, k] voxel indices.")
    return (int(s[0]), int(s[1]), int(s[2]))


def _image_shape_ijk(path: Path) -> tuple[int, int, int]:
    import SimpleITK as sitk

    if path.is_dir():
        from ..volume import read_volume

        return read_volume(path).shape_ijk
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        from ..volume import read_volume

        return read_volume(path).shape_ijk
    size = list(reader.GetSize()) + [1, 1]
    return (int(size[0]), int(size[1]), int(size[2]))


def _check_seeds_inside(path: Path, seeds, where: str) -> None:
    shape = _image_shape_ijk(path)
    for n, s in enumerate(seeds):
        if not all(0 <= v < d for v, d in zip(s, shape)):
            raise _fail(f"{where}.seeds[{n}]", f"seed point {list(s)} is outside the image {path.name} "
                        f"(size i,j,k = {list(shape)})", f"Use indices 0..{shape[0] - 1}, 0..{shape[1] - 1}, 0..{shape[2] - 1}.")


def seeds_from_rule(mask_path: Path, rule: dict, where: str) -> list[tuple[int, int, int]]:
    """``count`` voxels of the mask (label ``label`` or any nonzero), drawn with ``default_rng(random_seed)``."""
    import numpy as np

    from ..volume import read_volume

    count = rule.get("count", 8)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise _fail(where + ".count", f"must be a positive integer, got {count!r}", "Write count: 8.")
    arr = read_volume(mask_path).array  # [k, j, i]
    label = rule.get("label")
    kji = np.argwhere(arr == label if label is not None else arr != 0)
    if len(kji) < count:
        raise _fail(where, f"the mask {mask_path.name} has {len(kji)} voxels, fewer than count {count}",
                    "Lower count or use a larger mask.")
    rng = np.random.default_rng(int(rule.get("random_seed", 0)))
    picked = kji[np.sort(rng.choice(len(kji), size=count, replace=False))]
    return [(int(p[2]), int(p[1]), int(p[0])) for p in picked]


def _no_duplicates(items: list[str], where: str, what: str) -> None:
    seen = set()
    for it in items:
        if it in seen:
            raise _fail(where, f"{what} {it!r} appears twice, which would run the same runs twice",
                        "Remove the duplicate or give it another name.")
        seen.add(it)


def analysis_config(spec: StudySpec, method: str, card, random_seed: int | None = None) -> AnalysisConfig:
    """The :class:`AnalysisConfig` of one run: the study's dream settings over the card's recommendation."""
    d = dict(spec.dream)
    # each setting: the study's (or its method's), else the card's dream block, else the default
    chosen = {"method": method} if method != "default" else {}
    settings = dream_settings(card, d.pop("iterations", None), d.pop("step", None), **chosen)
    if "roi_size" in d and d["roi_size"] is not None:
        d["roi_size"] = tuple(d["roi_size"])
    base_seed = d.pop("random_seed", 0)
    if isinstance(base_seed, bool) or not isinstance(base_seed, int):
        raise _fail("dream.random_seed", f"must be an integer, got {base_seed!r}", "Write random_seed: 0.")
    values = {k: v for k, v in settings.values.items() if k not in ("snapshot_every", "random_seed")}
    values.update(d)
    dream = DreamConfig(**{**values, "random_seed": base_seed if random_seed is None else random_seed})
    custom = dict(spec.custom_features) if spec.custom_allowed else {}
    fc = FeatureConfig(names=tuple(spec.features) if spec.features is not None else None, backend=spec.feature_backend,
                       every=spec.feature_every, bin_width=spec.bin_width, custom=custom)
    return AnalysisConfig(dream=dream, features=fc, snapshot_every=spec.snapshot_every)


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, sorted)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def expand_runs(spec: StudySpec, hashes: dict[Path, str] | None = None) -> list[RunSpec]:
    """Every run of the study, in a stable order, each with its key (see the module docstring)."""
    hashes = spec.hashes if hashes is None else hashes

    def h(p: Path | None) -> str | None:
        if p is None:
            return None
        if p not in hashes:
            hashes[p] = file_sha256(p)
        return hashes[p]

    settings = {k: spec.raw.get(k) for k in ("dream", "features", "feature_backend", "feature_every", "bin_width",
                                               "snapshot_every", "restart_noise_std")}
    settings["reference"] = h(spec.reference)
    if spec.custom_features:  # the feature's code is part of the run: editing it runs the runs again
        files = custom_feature_files(spec)
        settings["custom_features"] = {n: {"target": t, "sha256": h(files[n]) if n in files else None}
                                       for n, t in sorted(spec.custom_features.items())}
    runs = []
    for m in spec.models:
        for im in spec.images:
            for si, seed in enumerate(im.seeds):
                for r in range(spec.restarts):
                    for method in spec.methods:
                        ident = {"model": h(m.path), "card": h(m.card), "image": h(im.path), "seed": list(seed),
                                 "restart": r, "method": method, "settings": settings}
                        key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
                        runs.append(RunSpec(key, m.name, m.group, im.name, seed, si, r, method))
    seen = {}
    for run in runs:
        if run.key in seen:
            raise _fail("models/images", f"{run.label()} and {seen[run.key].label()} are the same run (same files, "
                        "seed point and settings)", "Remove the duplicate model or image entry.")
        seen[run.key] = run
    return runs
