import threading
import time

import pytest

from netshrink import node_lock


@pytest.fixture(autouse=True)
def private_lock_files(tmp_path, monkeypatch):
    monkeypatch.setattr(node_lock, "GATE", tmp_path / "gate")
    monkeypatch.setattr(node_lock, "WORK", tmp_path / "work")


def _hold(context_manager, seconds, entered):
    with context_manager():
        entered.set()
        time.sleep(seconds)


def test_compute_waits_while_the_machine_is_being_measured():
    entered = threading.Event()
    holder = threading.Thread(target=_hold, args=(node_lock.quiet_machine, 0.4, entered))
    holder.start()
    entered.wait()
    start = time.perf_counter()
    with node_lock.compute_slot():
        waited = time.perf_counter() - start
    holder.join()
    assert waited > 0.3


def test_measurement_waits_for_compute_in_flight_and_compute_slots_share():
    first, second = threading.Event(), threading.Event()
    a = threading.Thread(target=_hold, args=(node_lock.compute_slot, 0.4, first))
    b = threading.Thread(target=_hold, args=(node_lock.compute_slot, 0.4, second))
    a.start()
    b.start()
    assert first.wait(1) and second.wait(1)  # two compute slots at once: shared
    start = time.perf_counter()
    with node_lock.quiet_machine():
        waited = time.perf_counter() - start
    a.join()
    b.join()
    assert waited > 0.25


def test_a_pending_measurement_is_not_starved_by_a_stream_of_steps():
    stop = threading.Event()

    def steps():
        while not stop.is_set():
            with node_lock.compute_slot():
                time.sleep(0.02)

    workers = [threading.Thread(target=steps) for _ in range(2)]
    for worker in workers:
        worker.start()
    time.sleep(0.1)
    start = time.perf_counter()
    with node_lock.quiet_machine():
        waited = time.perf_counter() - start
    stop.set()
    for worker in workers:
        worker.join()
    assert waited < 0.5
