"""stopping.py: SIGTERM and SIGHUP taken like Ctrl-C inside the command-line entry points only."""

import os
import signal
import threading

import pytest

from DeepDreamAnalysisLib.stopping import Stopped, stop_reason, stop_signals_interrupt


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_raises_a_keyboard_interrupt_and_the_previous_handler_comes_back(sig):
    mine = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(sig, mine)
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            with stop_signals_interrupt():
                os.kill(os.getpid(), sig)
                for _ in range(100):  # the handler runs between bytecodes
                    pass
        assert isinstance(caught.value, Stopped) and stop_reason(caught.value) == signal.Signals(sig).name
        assert signal.getsignal(sig) is mine
    finally:
        signal.signal(sig, previous)


def test_a_repeated_stop_signal_does_not_interrupt_the_clean_up():
    cleaned = []
    with pytest.raises(Stopped):
        with stop_signals_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100):
                    pass
            finally:
                os.kill(os.getpid(), signal.SIGHUP)  # e.g. the terminal closing while Ray shuts down
                for _ in range(100):
                    pass
                cleaned.append(True)
    assert cleaned == [True]
    assert stop_reason(KeyboardInterrupt()) == "Ctrl-C"


def test_outside_the_main_thread_nothing_is_installed():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    seen = {}

    def work():
        with stop_signals_interrupt():
            seen.update({s: signal.getsignal(s) for s in before})

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == before


def test_a_stop_within_deferred_is_raised_at_its_end():
    from DeepDreamAnalysisLib.stopping import deferred

    steps = []
    with pytest.raises(Stopped):
        with stop_signals_interrupt():
            with deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100):
                    pass
                steps.append("finished")
            steps.append("not reached")
    assert steps == ["finished"]
    with deferred():  # without a stop, and outside stop_signals_interrupt: nothing happens
        pass


PARENT = """
import concurrent.futures as cf, multiprocessing, os, sys, time
from DeepDreamAnalysisLib.stopping import exit_with_parent

if __name__ == "__main__":
    pool = cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent)
    pool.submit(time.sleep, 60)  # one worker busy
    pool.submit(time.sleep, 0.1).result()  # the other idle, waiting for work
    time.sleep(2)
    print(" ".join(str(p.pid) for p in pool._processes.values()), flush=True)
    os._exit(130)  # as a second Ctrl-C ends `run`: no shutdown of the pool
"""


def test_pool_workers_end_with_their_parent_however_it_ended(tmp_path):
    import subprocess
    import sys

    from process_tree import kill_all, still_alive

    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    out = tmp_path / "pids.txt"
    with open(out, "w") as fh:  # a file: a worker left behind would hold a pipe open
        done = subprocess.run([sys.executable, str(script)], stdout=fh, stderr=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 130
    pids = [int(p) for p in out.read_text().split()]
    assert len(pids) == 2
    left = still_alive(pids, within=10)
    kill_all(left)
    assert not left, f"pool workers outlived their parent: {left}"
