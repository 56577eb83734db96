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
