"""`deepdream-analysis study`: study files, the Ray engine (one shared local 2-worker cluster),
resume, retry, faults and the study outputs, on tiny real networks."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from DeepDreamAnalysisLib import cli
from DeepDreamAnalysisLib.studies import StudySpecError, expand_runs, load_study, run_study, run_study_outcome
from DeepDreamAnalysisLib.studies.engine import StudyEngineError, require_ray
from tiny_models import liver_like, tiny_card, tiny_net

ray = pytest.importorskip("ray", reason="the study extra (ray) is installed by `make test`")

FEATURES = ["firstorder_Mean", "shape2D_PixelSurface"]


def _save(net, card, folder: Path, name: str) -> Path:
    path = folder / f"{name}.pt"
    torch.jit.script(net).save(str(path))
    (folder / f"{name}.card.json").write_text(json.dumps(card.to_dict()))
    return path


def _image(folder: Path, name: str, shape=(1, 40, 48), seed=0) -> Path:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(liver_like(shape, seed=seed))
    img.SetSpacing((0.8, 0.8, 2.5))
    path = folder / f"{name}.nii.gz"
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study_inputs")
    return {"folder": folder, "a": _save(tiny_net(2, seed=0), tiny_card(2), folder, "a"),
            "b": _save(tiny_net(2, seed=1), tiny_card(2), folder, "b"),
            "net3d": _save(tiny_net(3), tiny_card(3), folder, "net3d"),
            "ct": _image(folder, "ct"), "ct2": _image(folder, "ct2", seed=1)}


def _spec(files, **over) -> dict:
    spec = {"name": "tiny", "models": [{"name": "a", "path": str(files["a"]), "group": "net"},
                                       {"name": "b", "path": str(files["b"]), "group": "net"}],
            "images": [{"name": "ct", "path": str(files["ct"]), "seeds": [[24, 20, 0], [20, 18, 0]]}],
            "restarts": 2, "dream": {"iterations": 4, "step": 15.0, "normalize_gradient": True},
            "features": FEATURES, "feature_backend": "native", "retries": 1, "snapshot_every": 2}
    spec.update(over)
    return spec


def _write(folder: Path, spec: dict, name="study.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="module")
def cluster():
    """One local Ray with 2 workers for every test of this module (Ray starts in seconds, not ms)."""
    from DeepDreamAnalysisLib.studies.engine import start_local_ray

    if not ray.is_initialized():
        start_local_ray(ray, 2)  # as run_study starts its local Ray
    yield
    ray.shutdown()


# ----------------------------------------------------------------------------- the study file (no Ray)


def test_study_file_errors_name_the_entry_and_the_fix(files, tmp_path):
    def err(spec):
        with pytest.raises(StudySpecError) as info:
            load_study(_write(tmp_path, spec))
        return str(info.value)

    msg = err(_spec(files, speed="fast"))
    assert "unknown key 'speed'" in msg and "Allowed keys" in msg
    msg = err(_spec(files, dream={"iterations": 3, "stepsize": 2}))
    assert "dream" in msg and "'stepsize'" in msg
    msg = err(_spec(files, models=[{"name": "a", "path": str(files["folder"] / "missing.pt")}]))
    assert "models[0].path" in msg and "missing.pt does not exist" in msg
    msg = err(_spec(files, images=[{"path": "nowhere/ct.nii.gz", "seeds": [[1, 1, 0]]}]))
    assert "images[0].path" in msg and "relative paths start at the study file's folder" in msg
    msg = err(_spec(files, images=[{"path": str(files["ct"]), "seeds": [[24, 20, 0], [48, 20, 0]]}]))
    assert "images[0].seeds[1]" in msg and "outside the image" in msg and "0..47" in msg
    msg = err(_spec(files, models=[{"name": "a", "path": str(files["a"])}, {"name": "again", "path": str(files["a"])}]))
    assert "same run" in msg and "Remove the duplicate" in msg
    msg = err(_spec(files, images=[{"path": str(files["ct"]), "seeds": [[24, 20, 0], [24, 20, 0]]}]))
    assert "appears twice" in msg
    msg = err(_spec(files, methods=["fancy"]))
    assert "methods" in msg and "fancy" in msg
    msg = err(_spec(files, batch=0))
    assert "batch" in msg and "batch: 1 to run each alone" in msg


def test_runs_are_batched_per_model_image_and_method_without_idling_workers(files):
    from DeepDreamAnalysisLib.studies.engine import batch_groups

    runs = expand_runs(load_study(_spec(files, restarts=3)))  # 2 models x 2 seed points x 3 restarts
    groups = batch_groups(runs, 4, slots=2)
    assert sorted(len(g) for g in groups) == [3, 3, 3, 3]
    assert all(len({(r.model, r.image, r.method) for r in g}) == 1 for g in groups)
    assert sorted(r.key for g in groups for r in g) == sorted(r.key for r in runs)
    assert len(batch_groups(runs, 12, slots=8)) >= 8  # never fewer batches than workers
    assert len(batch_groups(runs, 12, slots=2)) == 2
    assert len(batch_groups(runs[:10], 4, slots=2)) == 4  # 6 + 4 runs: 2 + 2 batches, not 2 + 1
    assert len(batch_groups(runs, 1, slots=1)) == 12


def test_yaml_study_file_with_a_seed_rule_and_relative_paths(files, tmp_path):
    import shutil

    import SimpleITK as sitk

    for key in ("a", "ct"):
        shutil.copy(files[key], tmp_path / files[key].name)
    shutil.copy(files["folder"] / "a.card.json", tmp_path / "a.card.json")
    mask = np.zeros((1, 40, 48), np.uint8)
    mask[0, 10:20, 30:40] = 1
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "liver.nii.gz"))
    (tmp_path / "s.yaml").write_text(
        "models:\n  - {name: a, path: a.pt}\nimages:\n  - path: ct.nii.gz\n"
        "    seed_rule: {mask: liver.nii.gz, count: 3, random_seed: 7}\nrestarts: 2\nmethods: [paper]\n")
    spec = load_study(tmp_path / "s.yaml")
    seeds = spec.images[0].seeds
    assert len(seeds) == 3 and all(30 <= i < 40 and 10 <= j < 20 and k == 0 for i, j, k in seeds)
    assert load_study(tmp_path / "s.yaml").images[0].seeds == seeds  # the same rule picks the same points
    runs = expand_runs(spec)
    assert len(runs) == 3 * 2 and len({r.key for r in runs}) == 6


def test_without_ray_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does when Ray is not installed
    with pytest.raises(StudyEngineError, match=r"pip install 'deepdream-analysis\[study\]'"):
        require_ray()


def test_without_address_the_study_runs_here_even_where_ray_address_points_elsewhere(files, tmp_path):
    """``RAY_ADDRESS`` set (a cluster's login node) or a ``ray start`` instance on this machine: plain
    ``ray.init`` would join it and refuse the study's ``num_cpus``; with no ``--address`` the study
    starts its own local Ray."""
    study = _write(tmp_path, _spec(files, models=[{"name": "a", "path": str(files["a"])}], restarts=1,
                                   images=[{"name": "ct", "path": str(files["ct"]), "seeds": [[24, 20, 0]]}]))
    cmd = [sys.executable, "-m", "DeepDreamAnalysisLib.cli", "study", str(study), "--out", str(tmp_path / "out"),
           "--workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": "127.0.0.1:9"})
    assert done.returncode == 0, done.stderr
    assert "1 of 1 runs done, 0 failed" in done.stdout


def test_a_local_ray_that_fails_to_start_is_shut_down_and_started_again():
    """Ray's raylet aborts its start when its dashboard agent is slower than 15 s to come up (a busy
    machine): what the failed start left is shut down, and Ray starts a second time; twice failed,
    the error says what happened."""
    from DeepDreamAnalysisLib.studies.engine import start_local_ray

    class FlakyRay:
        def __init__(self, failures):
            self.failures, self.calls = failures, []

        def init(self, **kwargs):
            self.calls.append("init")
            if self.calls.count("init") <= self.failures:
                raise Exception("The current node timed out during startup. This could happen because ...")

        def shutdown(self):
            self.calls.append("shutdown")

    flaky = FlakyRay(failures=1)
    start_local_ray(flaky, 2)
    assert flaky.calls == ["init", "shutdown", "init"]
    broken = FlakyRay(failures=2)
    with pytest.raises(StudyEngineError, match="Ray could not start on this machine .The current node timed out"):
        start_local_ray(broken, 2)
    assert broken.calls == ["init", "shutdown", "init", "shutdown"]


def test_unreachable_address_fails_fast_with_a_clear_message(files, tmp_path, capsys):
    study = _write(tmp_path, _spec(files))
    t = time.monotonic()
    rc = cli.main(["study", str(study), "--out", str(tmp_path / "out"), "--address", "ray://127.0.0.1:9",
                   "--connect-timeout", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "No Ray cluster answers at ray://127.0.0.1:9" in err and "--address" in err
    assert time.monotonic() - t < 60  # a bounded wait, not a hang


# ----------------------------------------------------------------------------- on the shared cluster


@pytest.fixture(scope="module")
def first_study(cluster, files, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    study = _write(files["folder"], _spec(files), "first.json")
    before = _shipped_model_folders()
    rc = cli.main(["study", str(study), "--out", str(out)])
    _LEFT_IN_TMP[:] = sorted(_shipped_model_folders() - before)
    return study, out, rc


_LEFT_IN_TMP: list = []


def _shipped_model_folders() -> set:
    import glob
    import tempfile

    return set(glob.glob(os.path.join(tempfile.gettempdir(), "ddstudy-*"))) - set(
        glob.glob(os.path.join(tempfile.gettempdir(), "ddstudy-features-*")))


def test_workers_leave_no_copy_of_a_shipped_model_in_tmp(first_study):
    study, out, rc = first_study
    assert rc == 0
    assert _LEFT_IN_TMP == [], f"the study left {len(_LEFT_IN_TMP)} folders in /tmp: {_LEFT_IN_TMP[:3]}"


def test_local_workers_run_at_the_priority_of_the_process_that_started_them(cluster, monkeypatch):
    # Ray's default runs workers 15 nice levels lower: every run of a study would yield to any other
    # program of the user's session, which a plain loop of the same runs does not (benchmarks/study_bench.py)
    from DeepDreamAnalysisLib.studies.engine import WORKER_NICENESS_ENV, local_ray_options

    def worker_nice():
        import os

        return os.nice(0)

    assert ray.get(ray.remote(worker_nice).options(num_cpus=1).remote()) == os.nice(0)
    monkeypatch.setenv(WORKER_NICENESS_ENV, "15")  # the user's own choice is kept
    assert "_system_config" not in local_ray_options(2)
    monkeypatch.delenv(WORKER_NICENESS_ENV)
    assert local_ray_options(2)["_system_config"] == {"worker_niceness": 0}


def test_study_command_runs_every_run_and_writes_the_table(first_study, files):
    study, out, rc = first_study
    assert rc == 0
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert len(runs) == 2 * 2 * 2 and {r["state"] for r in runs} == {"done"}
    import pyarrow.parquet as pq

    table = pq.read_table(out / "study.parquet")
    assert set(table.column("model").to_pylist()) == {"a", "b"}
    assert set(table.column("curve").to_pylist()) == {"objective", "probability", "mask_voxels", *FEATURES}
    assert table.num_rows == 8 * 4 * (3 + len(FEATURES))  # runs x iterations x curves
    for name in ("study.csv", "pooled.csv", "pooled.png", "sensitivity.csv", "ranking.md", "report.html"):
        assert (out / name).stat().st_size > 0, name
    for r in runs:  # each run's own folder as from `run`
        assert (out / r["folder"] / "curves.csv").is_file() and (out / r["folder"] / "report.html").is_file()
        # the 4 runs of each model (2 seed points x 2 restarts) went through it as one batch
        assert json.loads((out / r["folder"] / "status.json").read_text())["batch"] == 4
        assert json.loads((out / r["folder"] / "run.json").read_text())["batch"] == {"batched": True, "size": 4}
    sens = list(csv.DictReader(open(out / "sensitivity.csv")))
    unflagged = {r["run_key"] for r in sens if not r["quality_flags"]}
    ranked = [r for r in csv.DictReader(open(out / "ranking.csv")) if r["feature"] == FEATURES[0]]
    assert sum(int(r["runs"]) for r in ranked) == len(unflagged)  # flagged dreams are not ranked
    pooled = [r for r in csv.DictReader(open(out / "pooled.csv")) if r["curve"] == "probability"]
    assert {r["seed_points"] for r in pooled} == {"2"} and {r["training_seeds"] for r in pooled} == {"2"}


def test_pooled_rows_pool_runs_with_different_iterations_and_missing_values(tmp_path):
    # a run that stopped early and an empty cell (NaN): each iteration pools the runs that have a value
    from types import SimpleNamespace

    from DeepDreamAnalysisLib.studies.tables import pooled_rows

    curves = {"a0": "0,0.1\n5,0.5\n10,0.9\n", "a1": "0,0.3\n5,0.7\n", "b0": "0,0.2\n5,\n10,0.8\n"}
    runs = []
    for key, body in curves.items():
        (tmp_path / "runs" / key).mkdir(parents=True)
        (tmp_path / "runs" / key / "curves.csv").write_text("iteration,probability\n" + body)
        runs.append(SimpleNamespace(key=key, model=key[0], group="net", image="ct", seed_index=int(key[1]),
                                    restart=0, method="paper"))
    outcome = SimpleNamespace(out=tmp_path, runs=runs, status={k: {"state": "done"} for k in curves})
    rows = {r["iteration"]: r for r in pooled_rows(outcome, use_z=False)}
    assert sorted(rows) == [0, 5, 10]
    assert rows[5]["mean"] == pytest.approx(0.6) and rows[10]["mean"] == pytest.approx(0.85)
    # iteration 10: seed point 0 (runs a0, b0) alone has a value: no interval over seed points
    assert rows[10]["seed_points"] == 1 and np.isnan(rows[10]["ci_seed_low"])
    # over training seeds: model a 0.9, model b 0.8 -> 0.85 +- t(1) * sd / sqrt(2)
    half = 12.706 * np.std([0.9, 0.8], ddof=1) / np.sqrt(2)
    assert rows[10]["training_seeds"] == 2
    assert (rows[10]["ci_training_low"], rows[10]["ci_training_high"]) == pytest.approx((0.85 - half, 0.85 + half))
    assert rows[0]["seed_points"] == 2 and rows[0]["mean"] == pytest.approx(0.2)
    assert all(isinstance(r["iteration"], int) and isinstance(r["mean"], float) for r in rows.values())


def test_a_study_run_equals_the_same_run_alone(first_study, files):
    from DeepDreamAnalysisLib.analysis import run_analysis
    from DeepDreamAnalysisLib.models import load_model
    from DeepDreamAnalysisLib.studies.spec import analysis_config
    from DeepDreamAnalysisLib.volume import read_volume

    study, out, _ = first_study
    spec = load_study(study)
    run = next(r for r in expand_runs(spec) if r.model == "b" and r.restart == 0 and r.seed_index == 1)
    model = load_model(files["b"])
    alone = run_analysis(read_volume(files["ct"]), run.seed, model, analysis_config(spec, run.method, model.card))
    rows = list(csv.DictReader(open(out / "runs" / run.key / "curves.csv")))
    assert np.allclose([float(r["probability"]) for r in rows], alone.column("probability"), rtol=1e-6)


def test_rerun_redoes_nothing_and_reruns_only_what_is_missing(first_study, cluster):
    study, out, _ = first_study
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/curves.csv")}
    outcome = run_study_outcome(study, out)
    assert outcome.count("done") == 8
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/curves.csv")} == stamps
    victim = sorted(stamps)[0]
    (victim.parent / "status.json").unlink()  # as if the study had stopped before this run finished
    outcome = run_study_outcome(study, out)
    assert outcome.count("done") == 8
    changed = [p for p in stamps if p.stat().st_mtime_ns != stamps[p]]
    assert changed == [victim]


def test_the_folder_of_another_study_is_refused(first_study, files, tmp_path):
    _, out, _ = first_study
    other = _write(tmp_path, _spec(files, restarts=1))
    with pytest.raises(StudyEngineError, match="holds another study"):
        run_study(other, out)


def test_a_rerun_replaces_only_the_studys_own_files(first_study, tmp_path):
    """The study folder has a manifest as a run folder has (test_study_folder.py: the refusals)."""
    import shutil

    from DeepDreamAnalysisLib.errors import OutputError

    study, out, _ = first_study
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, symlinks=True)
    listed = json.loads((copy / "deepdream-manifest.json").read_text())["files"]
    assert {"study.json", "study.parquet", "runs.csv", "report.html"} <= set(listed)
    assert sum(f.endswith("/status.json") for f in listed) == 8
    key = sorted(p.name for p in (copy / "runs").iterdir())[0]
    (copy / "notes.txt").write_text("mine")
    (copy / "runs" / key / "notes.txt").write_text("mine too")
    with open(copy / "ranking.md", "a") as fh:
        fh.write("my remark\n")
    with pytest.raises(OutputError, match="ranking.md is listed in .* is not the file the tool wrote"):
        run_study_outcome(study, copy)  # an output the user edited is not replaced
    (copy / "ranking.md").unlink()
    outcome = run_study_outcome(study, copy)  # every run is done: only the tables are written again
    assert outcome.count("done") == 8 and (copy / "ranking.md").is_file()
    assert (copy / "notes.txt").read_text() == "mine" and (copy / "runs" / key / "notes.txt").read_text() == "mine too"
    assert not (copy / "deepdream.lock").exists()


def test_a_failing_run_is_retried_then_recorded_and_the_study_goes_on(cluster, files, tmp_path):
    spec = _spec(files, models=[{"name": "a", "path": str(files["a"])}, {"name": "vol", "path": str(files["net3d"])}],
                 images=[{"name": "slice", "path": str(files["ct"]), "seeds": [[24, 20, 0]]}], restarts=1, retries=1)
    outcome = run_study_outcome(_write(tmp_path, spec), tmp_path / "out")
    states = {outcome.status[r.key]["run"]["model"]: outcome.status[r.key] for r in outcome.runs}
    assert states["a"]["state"] == "done"
    assert states["vol"]["state"] == "failed" and states["vol"]["attempts"] == 2
    assert "single slice" in states["vol"]["message"]
    runs = {r["model"]: r for r in csv.DictReader(open(tmp_path / "out" / "runs.csv"))}
    assert runs["vol"]["state"] == "failed" and "single slice" in runs["vol"]["message"]
    assert "failed" in (tmp_path / "out" / "report.html").read_text()


def test_a_worker_killed_mid_run_is_retried_and_the_study_completes(cluster, files, tmp_path):
    spec = _spec(files, models=[{"name": "a", "path": str(files["a"])}], restarts=1,
                 images=[{"name": "ct", "path": str(files["ct"]), "seeds": [[24, 20, 0]]}],
                 dream={"iterations": 1500, "step": 15.0, "normalize_gradient": True}, snapshot_every=500)
    out = tmp_path / "out"
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("o", run_study_outcome(_write(tmp_path, spec), out)))
    t.start()
    deadline = time.monotonic() + 300
    beat = None
    while time.monotonic() < deadline and beat is None:
        beat = next(iter(out.glob("runs/*/worker.json")), None)
        time.sleep(0.05)
    assert beat is not None, "the run never started"
    os.kill(json.loads(beat.read_text())["pid"], signal.SIGKILL)
    t.join(300)
    outcome = box["o"]
    status = next(iter(outcome.status.values()))
    assert status["state"] == "done" and status["attempts"] == 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_study_stopped_in_the_callers_ray_session_cancels_its_runs_and_keeps_the_session(cluster, files, tmp_path):
    """From Python on a Ray session the caller started (the ``cluster`` fixture, as a notebook or the
    Slicer console would): a stop marks the runs interrupted, cancels the study's unfinished tasks
    (their workers end within seconds, not after 6000 iterations) and leaves the
    session running."""
    spec = _spec(files, models=[{"name": "a", "path": str(files["a"])}], restarts=2, batch=1,
                 images=[{"name": "ct", "path": str(files["ct"]), "seeds": [[24, 20, 0]]}],
                 dream={"iterations": 6000, "step": 15.0, "normalize_gradient": True}, snapshot_every=2000)
    study, out = _write(tmp_path, spec), tmp_path / "out"
    stop = threading.Event()

    def stop_when_both_run():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(list(out.glob("runs/*/worker.json"))) < 2:
            time.sleep(0.05)
        stop.set()

    threading.Thread(target=stop_when_both_run, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_study_outcome(study, out, cancel=stop)
    pids = [json.loads(p.read_text())["pid"] for p in out.glob("runs/*/worker.json")]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not [pid for pid in pids if _alive(pid)], "the study's runs went on after the stop"
    assert ray.is_initialized()
    free = ray.remote(lambda: "free").options(num_cpus=2)
    assert ray.get(free.remote(), timeout=120) == "free"  # the session still runs tasks, on both CPUs
    states = [json.loads(p.read_text())["state"] for p in out.glob("runs/*/status.json")]
    assert sorted(states) == ["interrupted", "interrupted"]


def _rerun_redoes_nothing(cmd, out: Path, finished: set) -> None:
    """The same command again completes the 8 runs without rewriting the ``finished`` ones."""
    stamps = {k: (out / "runs" / k / "curves.csv").stat().st_mtime_ns for k in finished}
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "8 of 8 runs done, 0 failed" in rerun.stdout
    assert {k: (out / "runs" / k / "curves.csv").stat().st_mtime_ns for k in finished} == stamps


@pytest.mark.slow
def test_ctrl_c_marks_runs_in_progress_and_the_same_command_resumes(files, tmp_path):
    # batch: 1 so that runs finish one by one (a batch's runs finish together)
    spec = _spec(files, dream={"iterations": 80, "step": 15.0, "normalize_gradient": True}, restarts=2, batch=1)
    study = _write(tmp_path, spec)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "DeepDreamAnalysisLib.cli", "study", str(study), "--out", str(out), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        states = [json.loads(p.read_text()).get("state") for p in out.glob("runs/*/status.json")]
        if "done" in states and "running" in states:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err
    states = [json.loads(p.read_text()).get("state") for p in out.glob("runs/*/status.json")]
    assert "interrupted" in states and "done" in states and "running" not in states
    finished = {p.parent.name for p in out.glob("runs/*/status.json") if json.loads(p.read_text())["state"] == "done"}
    _rerun_redoes_nothing(cmd, out, finished)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_stops_the_study_like_ctrl_c_and_leaves_no_process(files, tmp_path, sig):
    from process_tree import descendants, stop_and_expect_nothing_left

    spec = _spec(files, dream={"iterations": 80, "step": 15.0, "normalize_gradient": True}, restarts=2, batch=1)
    study = _write(tmp_path, spec)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "DeepDreamAnalysisLib.cli", "study", str(study), "--out", str(out), "--workers", "2"]
    err_file = tmp_path / "stderr.txt"
    with open(err_file, "w") as err:  # a file, not a pipe: a process left behind could hold a pipe open
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        states = [json.loads(p.read_text()).get("state") for p in out.glob("runs/*/status.json")]
        if "done" in states and "running" in states:
            break
        time.sleep(0.1)
    # gcs_server, raylet, Ray's agents, the workers running the runs (a worker between two runs is
    # titled otherwise for a moment: sample until one is running a run; all are recorded either way)
    started = descendants(proc.pid)
    while time.monotonic() < deadline and not any("execute_run" in c for c in started.values()):
        time.sleep(0.05)
        started.update(descendants(proc.pid))
    assert any("raylet" in c for c in started.values()) and any("execute_run" in c for c in started.values())
    stop_and_expect_nothing_left(proc, getattr(signal, sig), started, "the study", err_file.read_text)
    err = err_file.read_text()
    assert f"stopped ({sig}): runs in progress are marked interrupted" in err and "run the same command again" in err
    assert "Traceback" not in err and "SIGTERM received" not in err  # nor Ray's crash handler's dump
    states = {p.parent.name: json.loads(p.read_text()) for p in out.glob("runs/*/status.json")}
    assert "running" not in {s["state"] for s in states.values()}
    assert {s["message"] for s in states.values() if s["state"] == "interrupted"} == {
        f"stopped ({sig}); run the same command again to resume"}
    finished = {k for k, s in states.items() if s["state"] == "done"}
    assert finished and not (out / "deepdream.lock").exists()
    if sig == "SIGHUP":
        return  # the rerun is the same as after SIGTERM
    _rerun_redoes_nothing(cmd, out, finished)


@pytest.mark.slow
def test_sigterm_while_ray_starts_stops_the_study_like_ctrl_c_and_leaves_no_process(files, tmp_path):
    """``ray.init`` puts its own SIGTERM handler (exit at once) in place while it starts Ray: a
    SIGTERM then (a study stopped seconds after it began) stops the study as at any other moment."""
    from process_tree import descendants, kill_all, still_alive

    study = _write(tmp_path, _spec(files, models=[{"name": "a", "path": str(files["a"])}], restarts=1,
                                   images=[{"name": "ct", "path": str(files["ct"]), "seeds": [[24, 20, 0]]}]))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "DeepDreamAnalysisLib.cli", "study", str(study), "--out", str(out), "--workers", "1"]
    err_file = tmp_path / "stderr.txt"
    with open(err_file, "w") as err:  # a file, not a pipe: a process left behind could hold a pipe open
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    started: dict = {}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not any(
                "gcs_server" in c for c in started.values()):
            started.update(descendants(proc.pid))
            time.sleep(0.02)
        assert any("gcs_server" in c for c in started.values()), err_file.read_text()  # Ray is starting
        proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 60
        while time.monotonic() < end and proc.poll() is None:  # what the start goes on to start, too
            started.update(descendants(proc.pid))
            time.sleep(0.02)
        assert proc.wait(timeout=1) == 130, err_file.read_text()
        left = still_alive(started, within=30)
        assert not left, f"still running after the study ended: {left}"
    finally:
        kill_all(started)
        proc.kill()
    err = err_file.read_text()
    assert "stopped (SIGTERM)" in err and "Traceback" not in err, err
    assert not (out / "deepdream.lock").exists()
    assert "running" not in {json.loads(p.read_text())["state"] for p in out.glob("runs/*/status.json")}


STOP_WHILE_RECORDING = """
import os, signal, sys
from DeepDreamAnalysisLib import cli
from DeepDreamAnalysisLib.studies import engine

real = engine._write_status


def write_status(path, status):  # SIGTERM arrives while the driver records the first finished run
    if status.get("state") == "done" and not os.environ.get("SENT"):
        os.environ["SENT"] = "1"
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    real(path, status)


engine._write_status = write_status
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_stop_while_a_finished_run_is_recorded_leaves_no_run_marked_running(files, tmp_path):
    """SIGTERM raises at any line of the driver: also between taking a finished run off the list of
    runs in flight and writing its status, which left that run ``running`` for good. Every run ends
    the session ``done`` or ``interrupted``, never ``running``."""
    spec = _spec(files, models=[{"name": "a", "path": str(files["a"])}], restarts=3, batch=1,
                 images=[{"name": "ct", "path": str(files["ct"]), "seeds": [[24, 20, 0]]}])
    study, out = _write(tmp_path, spec), tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", STOP_WHILE_RECORDING, "study", str(study), "--out", str(out),
                           "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stderr
    assert "stopped (SIGTERM)" in done.stderr and "Traceback" not in done.stderr, done.stderr
    states = sorted(json.loads(p.read_text())["state"] for p in out.glob("runs/*/status.json"))
    assert len(states) == 3 and "running" not in states, states
    assert "interrupted" in states and not (out / "deepdream.lock").exists()


def test_a_study_from_python_keeps_the_callers_sigterm_handler(files, tmp_path):
    """ray.init replaces the SIGTERM handler with its own; a handler the caller installed survives a
    study (run_study installs none of its own for SIGTERM or SIGHUP)."""
    spec = _write(tmp_path, _spec(files, restarts=1, images=[{"name": "ct", "path": str(files["ct"]),
                                                              "seeds": [[24, 20, 0]]}]))
    code = f"""
import signal
from DeepDreamAnalysisLib.studies import run_study
mine = lambda signum, frame: None
signal.signal(signal.SIGTERM, mine)
hup = signal.getsignal(signal.SIGHUP)
run_study({str(spec)!r}, {str(tmp_path / "out")!r}, workers=1)
assert signal.getsignal(signal.SIGTERM) is mine, signal.getsignal(signal.SIGTERM)
assert signal.getsignal(signal.SIGHUP) is hup
print("kept")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "kept" in done.stdout, done.stderr


FEATURE_CODE = """
import pathlib

pathlib.Path(__file__).with_name("IMPORTED").touch()  # shows whether (and when) this code ran


def seed_value(image, mask, spacing, context):
    return float(image[context.seed_kji])
"""


def _custom_study(files, tmp_path):
    code = tmp_path / "feats"
    code.mkdir()
    (code / "my_features.py").write_text(FEATURE_CODE)
    spec = _spec(files, models=[{"name": "a", "path": str(files["a"])}], restarts=1,
                 images=[{"name": "ct", "path": str(files["ct"]), "seeds": [[24, 20, 0]]}],
                 custom_features={"seed_value": "feats/my_features.py:seed_value"})
    return _write(tmp_path, spec), code


def test_a_worker_never_loads_custom_features_that_were_not_allowed(files, tmp_path):
    from DeepDreamAnalysisLib.studies.engine import execute_run

    study, code = _custom_study(files, tmp_path)
    spec = load_study(study)  # reading a study file imports nothing
    assert spec.custom_features == {"seed_value": f"{code / 'my_features.py'}:seed_value"}
    with pytest.raises(StudySpecError, match="not allowed"):
        execute_run(expand_runs(spec)[0], {}, None, None, spec)
    assert not (code / "IMPORTED").exists()


def test_a_worker_without_the_users_feature_file_uses_the_copy_shipped_with_the_study(files, tmp_path):
    from DeepDreamAnalysisLib.features import load_custom
    from DeepDreamAnalysisLib.studies.engine import _local_custom
    from DeepDreamAnalysisLib.studies.spec import allow_custom_features

    study, code = _custom_study(files, tmp_path)
    spec = allow_custom_features(load_study(study), True)
    mine = code / "my_features.py"
    assert _local_custom(spec) == {"seed_value": f"{mine}:seed_value"}  # the same file here: the user's own
    mine.write_text("def seed_value(image, mask, spacing):\n    return -1.0\n")  # another machine's different file
    shipped = _local_custom(spec)["seed_value"]
    assert not shipped.startswith(str(mine)) and "ddstudy-features-" in shipped
    assert load_custom(shipped)(np.zeros((1, 3, 3)), np.ones((1, 3, 3), bool), (1, 1, 1),
                                context=type("C", (), {"seed_kji": (0, 1, 1)})()) == 0.0  # the allowed code


def test_custom_features_in_a_study_run_only_when_the_user_allows_them(cluster, files, tmp_path, capsys):
    import SimpleITK as sitk

    study, code = _custom_study(files, tmp_path)
    out = tmp_path / "out"
    assert cli.main(["study", str(study), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "names custom features (seed_value = " in err and "--custom-feature seed_value=" in err
    assert "--allow-custom-features" in err and "Traceback" not in err
    assert cli.main(["study", str(study), "--out", str(out), "--custom-feature", "seed_value=os:system"]) == 2
    assert "--custom-feature seed_value=" in capsys.readouterr().err  # another function is not the same opt-in
    assert not (code / "IMPORTED").exists() and not out.exists()

    allow = f"seed_value={code / 'my_features.py'}:seed_value"
    assert cli.main(["study", str(study), "--out", str(out), "--custom-feature", allow]) == 0
    assert (code / "IMPORTED").exists()
    rows = list(csv.DictReader(open(next(out.glob("runs/*/curves.csv")))))
    start = sitk.GetArrayFromImage(sitk.ReadImage(str(files["ct"])))[0, 20, 24]  # [k, j, i]
    assert float(rows[0]["seed_value"]) == pytest.approx(float(start), rel=1e-5)  # iteration 0: the start image
    assert all(np.isfinite(float(r["seed_value"])) for r in rows)
    import pyarrow.parquet as pq

    assert "seed_value" in set(pq.read_table(out / "study.parquet").column("curve").to_pylist())
    outcome = run_study_outcome(study, out, allow_custom_features=True)  # Python: the same opt-in; resumes
    assert outcome.count("done") == 1


def test_compare_on_the_study_engine_takes_custom_features(cluster, files, tmp_path, capsys):
    code = tmp_path / "feats"
    code.mkdir()
    (code / "my_features.py").write_text(FEATURE_CODE)
    argv = ["compare", "--image", str(files["ct"]), "--seed", "24,20,0", "--model", f"a={files['a']}", "--restarts",
            "1", "--iterations", "2", "--step", "15", "--features", FEATURES[0], "--feature-backend", "native",
            "--custom-feature", f"seed_value={code / 'my_features.py'}:seed_value", "--out", str(tmp_path / "cmp"),
            "--workers", "2"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    rows = [r for r in csv.DictReader(open(tmp_path / "cmp" / "comparison.csv")) if r["feature"] == "seed_value"]
    assert rows and all(r["value"] for r in rows)


def test_compare_on_the_study_engine_gives_the_same_comparison(cluster, files, tmp_path, capsys):
    base = ["compare", "--image", str(files["ct"]), "--seed", "24,20,0", "--model", f"a={files['a']}",
            "--model", f"b={files['b']}", "--restarts", "2", "--iterations", "4", "--step", "15",
            "--normalize-gradient", "--features", ",".join(FEATURES), "--feature-backend", "native"]
    assert cli.main(base + ["--out", str(tmp_path / "serial")]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "ray"), "--workers", "2"]) == 0
    capsys.readouterr()
    serial = list(csv.DictReader(open(tmp_path / "serial" / "comparison.csv")))
    on_ray = list(csv.DictReader(open(tmp_path / "ray" / "comparison.csv")))
    assert [(r["model"], r["restart"], r["iteration"], r["feature"]) for r in on_ray] == \
        [(r["model"], r["restart"], r["iteration"], r["feature"]) for r in serial]
    assert np.allclose([float(r["value"] or "nan") for r in on_ray], [float(r["value"] or "nan") for r in serial],
                       rtol=1e-5, equal_nan=True)
    assert len(list((tmp_path / "ray" / "study" / "runs").iterdir())) == 4  # each run's own folder
    assert cli.main(base + ["--out", str(tmp_path / "ray"), "--workers", "2"]) == 0  # a rerun replaces it
