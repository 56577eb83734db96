"""The ``deepdream-analysis`` command.

    deepdream-analysis run --image CT.nii.gz --model model.pt2 --seed i,j,k --out DIR [...]
    deepdream-analysis reference --images a.nii.gz b.nii.gz --masks a_seg.nii.gz b_seg.nii.gz --out stats.json
    deepdream-analysis demo [--out results/demo]
    deepdream-analysis features [--dims 2|3]
    deepdream-analysis card-template
    deepdream-analysis study study.yaml --out results/study1 [--address auto|ray://HOST:10001]
    deepdream-analysis compare --image CT.nii.gz --seed i,j,k --model a=a.pt --model b=b.pt --out DIR

Exit codes: 0 done, 1 the run stopped on a fault (partial result written), 2 bad input,
130 cancelled with Ctrl-C (partial result written).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path

from .errors import ConfigError, DeepDreamError, FeatureError, OutputError
from .stopping import Stopped, stop_reason, stop_signals_interrupt

EXIT_OK, EXIT_FAULT, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130


def resources_dir() -> Path:
    """The repository's Resources/ folder (bundled demo model), or $DEEPDREAM_RESOURCES."""
    env = os.environ.get("DEEPDREAM_RESOURCES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "Resources"


def _parse_seed(text: str) -> tuple[int, int, int]:
    try:
        parts = [int(round(float(v))) for v in text.replace(" ", "").split(",")]
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"--seed must be three integers i,j,k (voxel indices), got {text!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--seed must be three integers i,j,k (voxel indices), got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def _parse_roi(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--roi must be integers separated by commas, got {text!r}") from None


def _method_help() -> str:
    from .dreaming import list_methods
    from .dreaming.registry import needs_reference

    return "; ".join(f"{m.name}" + (f" ({', '.join(f'{k}={v:g}' for k, v in m.options.items())})" if m.options else "")
                     + (" [needs --reference]" if needs_reference(m.name) else "") for m in list_methods())


def _parse_method_option(text: str) -> tuple[str, float]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--method-option takes KEY=VALUE (e.g. copies=4), got {text!r}")
    key, value = (t.strip() for t in text.split("=", 1))
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--method-option {key}: the value must be a number, got {value!r}") from None
    return key, int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


def _add_dream_options(p: argparse.ArgumentParser, iterations: int | None = None, step: float | None = None) -> None:
    """The dream options. Each one left out comes from the model card's ``dream`` block, else the
    default (config.dream_settings: given > card > default)."""
    g = p.add_argument_group("dream (each option left out: the model card's dream block, else the default)")
    g.add_argument("--method", default=None,
                   help="how to dream: a method or methods joined with '+', e.g. robust+spectral (default: the "
                        "card's dream.method, else robust+spectral, the measured best; paper is the paper's exact update; "
                        "docs/dream-methods.md). Methods and their options: "
                        + _method_help().replace("%", "%%"))
    g.add_argument("--method-option", action="append", default=[], type=_parse_method_option, metavar="KEY=VALUE",
                   help="an option of the method's components, e.g. copies=8 or decay=1.5; repeatable")
    g.add_argument("--iterations", type=int, default=iterations,
                   help="gradient-ascent iterations (default: the model card's dream.iterations, else 300)")
    g.add_argument("--step", type=float, default=step,
                   help="paper: alpha in X <- X + alpha*grad (image units per unit gradient; default 1.0). Every other "
                        "method: the largest change of any voxel per iteration, in image units (HU for CT; default "
                        "1%% of the card's intensity window, e.g. 3.5 HU for a [-100, 250] window). Default: the "
                        "model card's dream.step, else those")
    g.add_argument("--normalize-gradient", action="store_true", default=None,
                   help="paper only: use alpha*g/max|g|, so --step is the largest change per voxel")
    g.add_argument("--objective", choices=("auto", "logit", "log_odds"), default=None,
                   help="what to raise at the seed: logit (the target class's logit), log_odds (logit minus "
                        "logsumexp of the other classes: the target must win, not only rise) or auto (default): "
                        "log_odds for a softmax network with more than two classes, logit otherwise")
    g.add_argument("--start", choices=("image", "noise"), default=None, help="start from the image (default) or white noise")
    g.add_argument("--noise-mean", type=float, default=None,
                   help="--start noise: mean in image units (default: the middle of the card's window, or its mean)")
    g.add_argument("--noise-std", type=float, default=None,
                   help="--start noise: standard deviation in image units (default: a sixth of the window, or its std)")
    g.add_argument("--update-radius", type=float, default=None, help="only change voxels within this many voxels of the seed")
    g.add_argument("--stop-probability", type=float, default=None, help="stop once p(seed) stayed above this for --stop-patience steps")
    g.add_argument("--stop-patience", type=int, default=None, help="(default 10)")
    g.add_argument("--roi", type=_parse_roi, default=None, help="crop size around the seed, [D,]H,W (default: the card's roi_size)")
    g.add_argument("--threshold", type=float, default=None, help="probability threshold of the mask (default 0.5)")
    g.add_argument("--random-seed", type=int, default=None, help="(default 0)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads torch may use (default: torch's choice, usually all cores)")
    f = p.add_argument_group("features")
    f.add_argument("--features", default=None, help="comma-separated pyradiomics names (default: the paper's seven features; 'none': no radiomics features, only the custom features given with --custom-feature, if any)")
    f.add_argument("--feature-backend", choices=("auto", "native", "pyradiomics"), default="auto")
    f.add_argument("--feature-every", type=int, default=1, help="compute features every N-th iteration")
    f.add_argument("--bin-width", type=float, default=25.0, help="grey-level bin width (image units)")
    f.add_argument("--custom-feature", action="append", default=[], metavar="NAME=MODULE:FUNCTION",
                   help="a user feature f(image, mask, spacing[, context]) -> float (docs/features.md); repeatable, kept with --features none")
    p.add_argument("--snapshot-every", type=int, default=None,
                   help="keep image and mask every N-th iteration (default: the card's dream.snapshot_every, else 10)")
    p.add_argument("--reference", default=None, help="reference statistics JSON (deepdream-analysis reference)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepdream-analysis",
        description="DeepDream analysis of a segmentation network: make it dream a lesion at a seed and "
                    "track the dreamed lesion's radiomic features (Couteaux et al., 2019).")
    parser.add_argument("--verbose", "-v", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one analysis")
    run.add_argument("--image", required=True, help="the start image (NIfTI, NRRD, MHA, DICOM folder)")
    run.add_argument("--model", required=True, help="TorchScript .pt/.ts, torch.export .pt2, MONAI bundle, or state dict + card")
    run.add_argument("--card", default=None, help="model card JSON (default: beside the model)")
    run.add_argument("--seed", required=True, type=_parse_seed, help="seed voxel i,j,k (0-based)")
    run.add_argument("--out", required=True, help="output folder")
    run.add_argument("--allow-code-targets", action="store_true",
                     help="let a model card or MONAI bundle build anything besides torch.nn.Module classes of "
                          "monai.networks and torch.nn (runs that code; see SECURITY.md)")
    run.add_argument("--overwrite", action="store_true",
                     help="write into a non-empty folder that holds no results of this tool (files the tool did "
                          "not write are still never replaced or deleted)")
    _add_dream_options(run)

    ref = sub.add_parser("reference", help="feature statistics of a reference set of real lesions")
    ref.add_argument("--images", nargs="+", required=True)
    ref.add_argument("--masks", nargs="+", required=True)
    ref.add_argument("--out", required=True, help="statistics JSON to write")
    ref.add_argument("--dims", type=int, choices=(2, 3), default=3, help="2: per axial slice (for 2D models), 3: per volume")
    ref.add_argument("--label", type=int, default=None, help="lesion label value in the masks (default: any nonzero)")
    ref.add_argument("--features", default=None)
    ref.add_argument("--bin-width", type=float, default=25.0)
    ref.add_argument("--feature-backend", choices=("auto", "native", "pyradiomics"), default="auto")

    demo = sub.add_parser("demo", help="analyse the bundled demo network on a healthy liver CT slice")
    demo.add_argument("--out", default="results/demo")
    demo.add_argument("--overwrite", action="store_true", help="write into a non-empty folder of other files")
    demo.add_argument("--iterations", type=int, default=None)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--feature-backend", choices=("auto", "native", "pyradiomics"), default="auto")

    feats = sub.add_parser("features", help="list the feature names")
    feats.add_argument("--dims", type=int, choices=(2, 3), default=3)

    sub.add_parser("card-template", help="print a model card to fill in")

    _add_compare_parser(sub)
    _add_study_parser(sub)
    return parser


def _feature_config(args, names_default=None):
    from .config import FeatureConfig

    custom = {}
    for item in getattr(args, "custom_feature", []) or []:
        if "=" not in item:
            raise FeatureError(f"--custom-feature takes NAME=MODULE:FUNCTION, got {item!r}.")
        name, target = item.split("=", 1)
        custom[name.strip()] = target.strip()
    names = None
    if args.features and args.features.strip().lower() == "none":
        names = ()
    elif args.features:
        names = tuple(n.strip() for n in args.features.split(",") if n.strip())
    elif names_default:
        names = names_default
    if custom:
        names = tuple(names or ()) + tuple(n for n in custom if n not in (names or ()))
        if not args.features and not names_default:
            names = None  # the paper's features plus the custom ones: resolved below
    return FeatureConfig(names=names, backend=args.feature_backend, every=getattr(args, "feature_every", 1),
                         bin_width=args.bin_width, custom=custom)


def dream_defaults(card) -> dict:
    """Iterations and step when the user gives none: the card's recommendation, else 300 and 1.0."""
    from .config import card_dream_settings, dream_settings

    iterations, step, _ = dream_settings(card)
    return {"iterations": iterations, "step": step,
            "snapshot_every": int(card_dream_settings(card).get("snapshot_every", 10))}


def _analysis_config(args, spatial_dims: int, card=None):
    from .config import AnalysisConfig, DreamConfig, paper_features

    fc = _feature_config(args)
    if fc.custom and fc.names is None:
        fc.names = tuple(paper_features(spatial_dims)) + tuple(fc.custom)
    settings = dream_settings_from_args(args, card)
    dream = settings.config(roi_size=args.roi, device=args.device)
    dream.validate()
    snapshot_every = args.snapshot_every if args.snapshot_every is not None else int(settings.values["snapshot_every"])
    return AnalysisConfig(dream=dream, features=fc, snapshot_every=snapshot_every)


def dream_settings_from_args(args, card):
    """Every dream setting from the command line, else the card's dream block, else the default."""
    from .config import dream_settings

    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be a positive number of CPU threads, got {threads}.")
        import torch

        torch.set_num_threads(int(threads))
    options = dict(getattr(args, "method_option", None) or []) or None
    user = {k: getattr(args, k, None) for k in (
        "method", "objective", "normalize_gradient", "start", "noise_mean", "noise_std", "update_radius",
        "stop_probability", "stop_patience", "threshold", "random_seed")}
    return dream_settings(card, getattr(args, "iterations", None), getattr(args, "step", None),
                          method_options=options, **user)


def check_output_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check it is writable, before any work is done."""
    from .report import check_writable

    return check_writable(path)


class _CtrlC:
    """First Ctrl-C (or SIGTERM, SIGHUP): cancel the run cleanly (partial result kept). Second: stop at once.

    While the analysis runs in its worker thread (:func:`_run_in_thread`), "at once" means at once even
    in the middle of a long forward pass: the process ends without writing anything (the output folder
    stays as it was before the run; a folder the run created is removed while empty). Otherwise the
    second signal raises KeyboardInterrupt, and the atomic writes leave only whole files.
    """

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

    def __init__(self):
        self.event = threading.Event()
        self._previous = {}
        self.hard_exit = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):
                    pass
        return self.event

    def _handle(self, signum, frame):
        if self.event.is_set():
            if self.hard_exit:
                _exit_now()
            raise KeyboardInterrupt if signum == signal.SIGINT else Stopped(signum)
        self.event.set()
        what = {getattr(signal, "SIGTERM", None): "Terminated", getattr(signal, "SIGHUP", None): "Hangup"}.get(
            signum, "Ctrl-C")
        _say(f"\n{what}: cancelling after this iteration; the partial result will be written "
             "(Ctrl-C again to stop at once, writing nothing)...")

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            try:
                signal.signal(sig, previous)
            except (ValueError, OSError, TypeError):
                pass
        self._previous = {}
        return False


_ACTIVE_FOLDERS: list = []  # OutputFolder objects of this run, cleaned up by _exit_now


def _exit_now() -> None:
    """End the process at once (second Ctrl-C): nothing is written; locks and empty new folders go."""
    from .outputs.lock import release_all

    for folder in list(_ACTIVE_FOLDERS):
        try:
            folder.release(remove_if_empty=True)
        except Exception:  # noqa: BLE001 - best effort, we are exiting
            pass
    release_all()
    try:
        sys.stderr.write("\nstopped at once; nothing was written (the output folder is as it was).\n")
        sys.stderr.flush()
    finally:
        os._exit(EXIT_CANCELLED)


def _run_in_thread(fn, ctrl: "_CtrlC"):
    """``fn()`` in a worker thread while this (main) thread waits, so signals are handled at once."""
    box: dict = {}

    def work():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=work, name="DeepDreamAnalysis", daemon=True)
    worker.start()
    ctrl.hard_exit = True
    try:
        while worker.is_alive():
            worker.join(0.1)
    finally:
        ctrl.hard_exit = False
    if "error" in box:
        raise box["error"]
    return box["result"]


def _run_and_write(volume, seed, model, config, reference, out: Path, quiet: bool = False) -> int:
    from .analysis import run_analysis
    from .progress_bar import ProgressBar
    from .report import write_outputs

    bar = None if quiet else ProgressBar()
    ctrl = _CtrlC()
    with ctrl as cancel:
        result = _run_in_thread(lambda: run_analysis(volume, seed, model, config, reference, on_progress=bar,
                                                     cancel=cancel), ctrl)
        if bar is not None:
            bar.close()
        paths = write_outputs(result, out, volume)  # a second Ctrl-C here leaves whole files only
    _print_summary(result, paths, out)
    if result.status == "cancelled":
        return EXIT_CANCELLED
    if result.status == "fault":
        return EXIT_FAULT
    return EXIT_OK


def _print_summary(result, paths, out: Path) -> None:
    steps = result.steps
    if steps:
        first = result.first_iteration_above(0.5)
        print(f"{result.status}: {len(steps)} iterations; p(seed) {steps[0].probability:.3f} -> {steps[-1].probability:.3f}"
              + (f", above 0.5 from iteration {first}" if first is not None else ", never above 0.5")
              + f"; final mask {steps[-1].mask_voxels} voxels.")
    if result.metadata.get("fault"):
        print(f"fault: {result.metadata['fault']}", file=sys.stderr)
    if not result.normalised:
        print("note: no reference statistics given; curves are raw feature values, not z-scores.")
    for warning in result.metadata.get("warnings", []) or []:
        print(f"warning: {warning}", file=sys.stderr)
    print_quality(result)
    hint = step_hint(result)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    print(f"Results in {out}/:")
    snapshots = [p for p in paths.values() if Path(p).parent.name == "snapshots"]
    for key, path in paths.items():
        if path not in snapshots:
            print(f"  {key:8s} {path}")
    if snapshots:
        print(f"  {'snapshots':8s} {Path(snapshots[0]).parent}/ ({len(snapshots)} NIfTI files)")


def print_quality(result, stream=None) -> None:
    """One line per quality flag (docs/quality-flags.md), or a line saying no check fired."""
    flags = getattr(result, "quality_flags", None) or []
    if not result.steps:
        return
    if not flags:
        print("quality: no quality flag (the dream passed every check; docs/quality-flags.md).", file=stream or sys.stdout)
        return
    print(f"quality: {len(flags)} flag(s), the dream may not be trustworthy (docs/quality-flags.md):",
          file=stream or sys.stderr)
    for flag in flags:
        print(f"  [{flag.code}] {flag.message}", file=stream or sys.stderr)


def step_hint(result) -> str | None:
    """Advice that names the likely cause when a run did not give a clean dream (None when it did):
    another class won at the seed -> log-odds; the mask exploded -> a region or a higher threshold;
    nothing moved -> a larger step, with the number to try; it moved but too slowly -> iterations."""
    steps = result.steps
    if result.status not in ("completed", "stopped") or not steps:
        return None
    codes = {getattr(f, "code", None) for f in (getattr(result, "quality_flags", None) or [])}
    dream = result.metadata.get("configuration", {}).get("dream", {})
    method, step, n = dream.get("method", "paper"), dream.get("step"), len(steps)
    if "wrong_class" in codes:
        return ("another class wins at the seed: the objective rose but a neighbouring class rose faster. Use "
                "--objective log_odds (the target must win, not only rise; --objective auto does it for softmax "
                "networks with more than two classes).")
    if codes & {"mask_exploded", "mask_covers_half_crop", "mask_touches_border"}:
        return ("the dreamed mask spread over the crop (merged with the network's other detections): restrict the "
                "change with --update-radius (voxels, e.g. 10) or --method accentuate, raise --threshold (e.g. 0.7), "
                "or pick a seed farther from what the network already segments.")
    if result.first_iteration_above(0.5) is not None:
        return None
    if result.metadata.get("seed_output_constant"):
        return ("the network's output at the seed stopped depending on the image (its gradient there is exactly "
                "zero: the ReLU units feeding the seed are all off), so a larger step or more iterations cannot help. "
                + ("Use a method other than paper (they redirect the gradient through off torch.nn.ReLU layers), "
                   if method == "paper" else "") + "Start from noise (--start noise) or move the seed a few voxels.")
    moved = steps[-1].objective - steps[0].objective
    shown = ("1" if method == "paper" else "auto") if step is None else format(step, "g")
    head = (f"the probability at the seed never passed 0.5 in {n} iterations (objective {steps[0].objective:+.3f} -> "
            f"{steps[-1].objective:+.3f}). ")
    if abs(moved) < 1.0:
        if method == "paper":
            target = (step or 1.0) * (100.0 if abs(moved) < 1e-3 else min(100.0, max(4.0, 4.0 / abs(moved))))
            return head + (f"Nothing moved: the step is too small for this network: try a larger --step (now {shown}; "
                           f"try {target:g}), or --method ascent with --step in image units per iteration (its default "
                           "is 1% of the card's window). A card's dream.step sets the default (docs/model-card.md).")
        return head + (f"Nothing moved: try a larger --step (now {shown} image units per iteration; try 4 times that) "
                       "or more --iterations. A card's dream.step sets the default (docs/dream-methods.md).")
    return head + (f"It moved but not far enough: try more --iterations (now {n}) or a larger --step (now {shown}). "
                   "A card's dream block sets the defaults (docs/model-card.md).")


def cmd_run(args) -> int:
    from .models import load_model
    from .reference import ReferenceStats
    from .volume import read_volume

    inputs = [args.image, args.model, args.card, args.reference]
    folder = open_output_folder(args.out, inputs, overwrite=getattr(args, "overwrite", False))
    ok = False
    try:
        volume = read_volume(args.image)
        model = load_model(args.model, card=args.card, device="cpu", allow_code_targets=args.allow_code_targets)
        for note in getattr(model, "notes", []) or []:
            print(f"note: {note}", file=sys.stderr)
        if model.executes_code:
            print(f"note: {model.format} models run their author's code when loaded; use models you trust.",
                  file=sys.stderr)
        config = _analysis_config(args, model.card.spatial_dims, model.card)
        reference = ReferenceStats.load(args.reference) if args.reference else None
        code = _run_and_write(volume, args.seed, model, config, reference, folder.path)
        ok = True
        return code
    finally:
        # bad input found before anything was written: leave no empty folder behind
        close_output_folder(folder, remove_if_empty=not ok)


def open_output_folder(out, inputs=(), overwrite: bool = False):
    """Check, create and lock the output folder (see :mod:`.outputs.folder`) before any work is done."""
    from .outputs import check_output_folder

    folder = check_output_folder(out, [i for i in inputs if i], overwrite=overwrite)
    _ACTIVE_FOLDERS.append(folder)
    return folder


def close_output_folder(folder, remove_if_empty: bool = False) -> None:
    if folder in _ACTIVE_FOLDERS:
        _ACTIVE_FOLDERS.remove(folder)
    folder.release(remove_if_empty=remove_if_empty)


def cmd_reference(args) -> int:
    from .config import FeatureConfig
    from .features import build_feature_set
    from .reference import compute_reference

    if len(args.images) != len(args.masks):
        raise ConfigError(f"Give one mask per image: {len(args.images)} images but {len(args.masks)} masks.")
    names = tuple(n.strip() for n in args.features.split(",")) if args.features else None
    fs = build_feature_set(FeatureConfig(names=names, backend=args.feature_backend, bin_width=args.bin_width), args.dims)
    _check_reference_out(Path(args.out), list(args.images) + list(args.masks))
    check_output_dir(Path(args.out).parent if Path(args.out).parent != Path("") else Path("."))
    stats = compute_reference(list(zip(args.images, args.masks)), fs, label=args.label)
    stats.save(args.out)
    print(f"Reference statistics of {stats.lesion_count} lesions, {len(fs.names)} features -> {args.out}")
    return EXIT_OK


def _check_reference_out(out: Path, inputs: list) -> None:
    """The statistics file may not be one of the inputs, nor replace a file that is not statistics."""
    from .errors import OutputError
    from .outputs import inputs_inside

    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; give the path of the statistics JSON file to write.")
    clash = [item for item, how in inputs_inside(out, inputs) if how == "is inside the output folder"]
    if clash:
        raise OutputError(f"--out {out} is the input {clash[0]}; writing the statistics there would replace it. "
                          "Give a new file name, e.g. stats.json.")
    if os.path.lexists(out):
        try:
            with open(out, "rb") as fh:
                head = fh.read(4096)
        except OSError:
            head = b""
        if not out.is_file() or b'"features"' not in head:
            raise OutputError(f"--out {out} exists and is not a statistics file written by this tool; it will not be "
                              "replaced. Give a new file name, or move that file away.")


def cmd_demo(args) -> int:
    res = resources_dir() / "DemoModel"
    model_path = res / "demo_unet.pt"
    if not model_path.is_file():
        raise DeepDreamError(f"The demo model is missing ({model_path}). Run from a source checkout, or `make train-demo`.")
    folder = open_output_folder(args.out, [res], overwrite=getattr(args, "overwrite", False))
    try:
        return _demo(args, res, model_path, folder.path)
    finally:
        close_output_folder(folder)


def _demo(args, res: Path, model_path: Path, out: Path) -> int:
    from .config import AnalysisConfig, DreamConfig, FeatureConfig
    from .lits import demo_case
    from .models import load_model
    from .reference import ReferenceStats

    model = load_model(model_path)
    settings = dream_defaults(model.card)
    volume, seed = demo_case()
    ref_path = res / "demo_reference.json"
    reference = ReferenceStats.load(ref_path) if ref_path.is_file() else None
    from .config import dream_settings

    dream = dream_settings(model.card, args.iterations or None).config(device=args.device)
    config = AnalysisConfig(dream=dream, features=FeatureConfig(backend=args.feature_backend),
                            snapshot_every=int(settings.get("snapshot_every", 10)))
    print(f"Demo: {model.card.name} on a healthy liver slice of LiTS volume 117 (CC BY-NC-SA 4.0), "
          f"seed (i,j,k)={seed}, {dream.iterations} iterations, method {dream.method}, step "
          f"{'auto' if dream.step is None else dream.step}.")
    return _run_and_write(volume, seed, model, config, reference, out)


def cmd_features(args) -> int:
    from .features import list_features

    for group, names in list_features(args.dims).items():
        print(f"{group}:")
        for n in names:
            print(f"  {n}")
    return EXIT_OK


def cmd_card_template(args) -> int:
    from .card import CARD_TEMPLATE

    print(json.dumps(CARD_TEMPLATE, indent=2))
    return EXIT_OK


# ----------------------------------------------------------------------------- compare


def _parse_named(items, what: str) -> list[tuple[str | None, str]]:
    out = []
    for item in items or []:
        if "=" in item:
            name, path = item.split("=", 1)
            name = name.strip()
            if not name:
                raise ConfigError(f"--{what} {item!r}: the name before '=' is empty. Write NAME=PATH.")
            out.append((name, path.strip()))
        else:
            out.append((None, item.strip()))
    return out


def _add_compare_parser(subparsers) -> None:
    """Add the ``compare`` subcommand to the ``deepdream-analysis`` parser."""
    from .studies import DEFAULT_RESTART_NOISE_STD

    p = subparsers.add_parser("compare", help="compare several models (with random restarts) on one image and seed",
                              description="Run the same start image and seed through several models, several "
                                          "random restarts each, and overlay their feature curves with mean and "
                                          "spread (comparison.png, comparison.csv, sensitivity.csv, ranking.md).")
    p.add_argument("--image", required=True, help="the start image (NIfTI, NRRD, MHA, DICOM folder)")
    p.add_argument("--seed", required=True, type=_parse_seed, help="seed voxel i,j,k (0-based)")
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="a model to compare, named; repeat for each model (a bare PATH is named after its file)")
    p.add_argument("--card", action="append", default=[], metavar="NAME=CARD.json",
                   help="model card of the model NAME (default: beside the model); bare paths go to the models in order")
    p.add_argument("--restarts", type=int, default=3, help="random restarts per model (default 3)")
    p.add_argument("--restart-noise-std", type=float, default=DEFAULT_RESTART_NOISE_STD,
                   help="with --start image: std (image units, HU) of the Gaussian noise added to the start image "
                        f"of restarts 1, 2, ... (default {DEFAULT_RESTART_NOISE_STD:g}; 0 runs a single restart)")
    p.add_argument("--no-batch-restarts", dest="batch_restarts", action="store_false",
                   help="run the restarts of each model one after the other instead of as one batch through its "
                        "network (the results are the same up to floating-point rounding; docs/studies.md)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder that holds no results of this tool (files the tool did not "
                        "write are still never replaced or deleted)")
    p.add_argument("--allow-code-targets", action="store_true",
                   help="let a MONAI bundle config build classes outside monai and torch (runs their code)")
    p.add_argument("--keep-flagged", action="store_true",
                   help="rank runs with quality flags too (default: left out of the ranking; docs/quality-flags.md)")
    p.add_argument("--workers", type=int, default=None,
                   help="run the runs in parallel on the study engine (a local Ray with this many workers; docs/studies.md)")
    p.add_argument("--address", default=None, help="run the runs on a Ray cluster (auto or ray://HOST:10001)")
    _add_dream_options(p)


def cmd_compare(args) -> int:
    """The ``compare`` subcommand: load the models, run :func:`.studies.compare_models`, write the outputs."""
    specs = _parse_named(args.model, "model")
    named = []
    for name, path in specs:
        named.append((name or Path(path).stem, path))
    seen = set()
    for name, _ in named:
        if name in seen:
            raise ConfigError(f"Two models are named {name!r}; give each --model a distinct NAME=PATH.")
        seen.add(name)
    cards = _parse_named(args.card, "card")
    card_of: dict[str, str] = {}
    bare = [p for n, p in cards if n is None]
    if bare and len(bare) != len(named):
        raise ConfigError(f"{len(bare)} --card without a name for {len(named)} models: give one per model in order, "
                          "or write --card NAME=CARD.json.")
    for (name, _), path in zip(named, bare):
        card_of[name] = path
    for name, path in cards:
        if name is not None:
            if name not in seen:
                raise ConfigError(f"--card {name}=...: there is no model named {name!r} (models: {', '.join(seen)}).")
            card_of[name] = path
    inputs = [args.image, getattr(args, "reference", None)] + [p for _, p in named] + list(card_of.values())
    folder = open_output_folder(args.out, inputs, overwrite=getattr(args, "overwrite", False))
    out = folder.path
    ok = False
    try:
        code = _compare_in(args, named, card_of, out)
        ok = True
        return code
    finally:
        close_output_folder(folder, remove_if_empty=not ok)


def _compare_in(args, named, card_of, out: Path) -> int:
    from .models import load_model
    from .studies import compare_models, write_comparison
    from .volume import read_volume

    volume = read_volume(args.image)
    models = {name: load_model(path, card=card_of.get(name), device="cpu", allow_code_targets=args.allow_code_targets)
              for name, path in named}
    dims = {m.card.spatial_dims for m in models.values()}
    # the cards' recommended dream settings apply when every model recommends the same ones
    recommended = {json.dumps(m.card.dream or {}, sort_keys=True) for m in models.values()}
    shared_card = next(iter(models.values())).card if len(recommended) == 1 else None
    if shared_card is None and (args.step is None or args.iterations is None):
        print("note: the models' cards recommend different dream settings; give --step and --iterations to "
              "choose one for all (using 1.0 and 300 otherwise).", file=sys.stderr)
    config = _analysis_config(args, dims.pop() if len(dims) == 1 else 3, shared_card)
    reference = None
    if args.reference:
        from .reference import ReferenceStats

        reference = ReferenceStats.load(args.reference)
    if args.workers is not None or args.address is not None:  # the same runs on the study engine
        from .studies import compare_on_study, print_progress

        files = {name: (path, card_of.get(name)) for name, path in named}
        comp = compare_on_study(args.image, args.seed, files, config, args.reference, restarts=args.restarts,
                                restart_noise_std=args.restart_noise_std, out=out / "study", address=args.address,
                                workers=args.workers, keep_flagged=args.keep_flagged, on_progress=print_progress(),
                                batch=args.batch_restarts)
    else:
        reporter = _CompareReporter()
        ctrl = _CtrlC()
        with ctrl as cancel:
            comp = _run_in_thread(lambda: compare_models(
                volume, args.seed, models, config, reference, restarts=args.restarts, on_progress=reporter,
                cancel=cancel, restart_noise_std=args.restart_noise_std, keep_flagged=args.keep_flagged,
                batch=args.batch_restarts), ctrl)
            reporter.close()
    from .outputs import ManifestWriter

    with ManifestWriter(out) as manifest:  # never replaces a file the tool did not write
        paths = write_comparison(comp, out)
        manifest.finish()
    print(f"{comp.metadata['status']}: {len(comp.models)} models x {comp.restarts} restarts, "
          f"{len(comp.iterations)} iterations each.")
    if not comp.normalised:
        print("note: no reference statistics given; curves are raw feature values, not z-scores.")
    for r in (r for r in comp.ranking() if r.rank == 1):
        print(f"  {r.model}: most sensitive feature {r.feature} ({r.key} {r.mean:.3g})")
    for line in comp.ranking_note():
        print(f"quality: {line}", file=sys.stderr)
    print(f"Results in {out}/:")
    for key, path in paths.items():
        print(f"  {key:12s} {path}")
    if comp.metadata["status"] == "cancelled":
        return EXIT_CANCELLED
    if comp.metadata["status"] == "fault":
        return EXIT_FAULT
    return EXIT_OK


class _CompareReporter:
    """Prints one line per finished run and a progress bar within each run."""

    def __init__(self):
        from .progress_bar import ProgressBar

        self._bar_cls = ProgressBar
        self._bar = None
        self._run = -1

    def __call__(self, cp) -> None:
        if cp.run_index != self._run:
            if self._bar is not None:
                self._bar.close()
            self._run = cp.run_index
            sys.stderr.write(f"run {cp.run_index + 1}/{cp.total_runs}: model {cp.model}, restart {cp.restart}\n")
            self._bar = self._bar_cls()
        self._bar(cp.progress)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ----------------------------------------------------------------------------- study


def _add_study_parser(subparsers) -> None:
    """Add the ``study`` subcommand (docs/studies.md)."""
    p = subparsers.add_parser("study", help="run a study file (models x images x seed points x restarts x methods) on Ray",
                              description="Run every run of a study file on Ray (local by default), resumably, and "
                                          "write the tidy table, the pooled comparison, the sensitivity ranking and "
                                          "an HTML report into --out (docs/studies.md).")
    p.add_argument("spec", help="the study file (.yaml or .json)")
    p.add_argument("--out", required=True, help="the study folder (run the same command again to resume)")
    p.add_argument("--address", default=None,
                   help="join a running Ray cluster: auto, or ray://HOST:10001 (default: a local Ray on this machine)")
    p.add_argument("--workers", type=int, default=None, help="local workers (default: one per core)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for --address (default 10)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder that holds no results of this tool (files the tool did not "
                        "write are still never replaced or deleted)")
    p.add_argument("--custom-feature", action="append", default=[], metavar="NAME=MODULE:FUNCTION",
                   help="allow the study file's custom feature NAME, which must name the same function: custom "
                        "features are Python code and run only when you ask (SECURITY.md); repeatable")
    p.add_argument("--allow-custom-features", action="store_true",
                   help="allow every custom feature the study file names (its code runs on every worker)")


def cmd_study(args) -> int:
    """The ``study`` subcommand: :func:`.studies.run_study_outcome` with a progress line."""
    from .studies import print_progress, run_study_outcome

    allowed = True if args.allow_custom_features else {}
    for item in [] if allowed is True else args.custom_feature:
        if "=" not in item:
            raise FeatureError(f"--custom-feature takes NAME=MODULE:FUNCTION, got {item!r}.")
        name, target = item.split("=", 1)
        allowed[name.strip()] = target.strip()
    try:
        outcome = run_study_outcome(args.spec, args.out, address=args.address, workers=args.workers,
                                    on_progress=print_progress(), connect_timeout_s=args.connect_timeout,
                                    overwrite=args.overwrite, allow_custom_features=allowed or False)
    except KeyboardInterrupt as stop:
        _say(f"\nstopped ({stop_reason(stop)}): runs in progress are marked interrupted in {args.out}/runs/*/status.json; "
             "run the same command again to resume (finished runs are kept).")
        return EXIT_CANCELLED
    done, failed = outcome.count("done"), outcome.count("failed")
    print(f"{done} of {len(outcome.runs)} runs done, {failed} failed. Results in {outcome.out}/:")
    for key, path in outcome.paths.items():
        print(f"  {key:12s} {path}")
    if failed:
        print(f"failed runs and their messages: {outcome.out}/runs.csv", file=sys.stderr)
        return EXIT_FAULT
    return EXIT_OK


COMMANDS = {"run": cmd_run, "compare": cmd_compare, "study": cmd_study, "reference": cmd_reference, "demo": cmd_demo, "features": cmd_features,
            "card-template": cmd_card_template}


_NUMBER_LIST = re.compile(r"-\s*\d[\d.,\s\-eE+]*")


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--seed -1,0,0`` -> ``--seed=-1,0,0``: argparse would read ``-1,0,0`` as an option, so the seed's
    own check (a voxel outside the image) could never say what is wrong."""
    out = []
    for i, item in enumerate(argv):
        if out and out[-1] in ("--seed", "--roi") and _NUMBER_LIST.fullmatch(item):
            out[-1] = f"{out[-1]}={item}"
            continue
        out.append(item)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    handler = COMMANDS[args.command]
    with stop_signals_interrupt():  # SIGTERM and SIGHUP stop the command as Ctrl-C does (stopping.py)
        try:
            return handler(args)
        except DeepDreamError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt as stop:
            _say(f"\nstopped ({stop_reason(stop)}).")
            return EXIT_CANCELLED
        except BrokenPipeError:  # output piped into `head` and the like
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_OK


def _say(text: str) -> None:
    """A line on stderr, if it can still be written (after SIGHUP the terminal may be gone)."""
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
