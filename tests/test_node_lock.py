import os
import re
import stat
import tempfile
import threading
import time

import pytest

from netshrink import node_lock


@pytest.fixture(autouse=True)
def private_lock_files(tmp_path, monkeypatch):
    monkeypatch.setenv(node_lock.LOCK_DIR_VARIABLE, str(tmp_path / "locks"))
    node_lock.lock_files.cache_clear()
    yield
    node_lock.lock_files.cache_clear()  # later tests resolve the folder again, from the restored environment


@pytest.fixture
def default_folder(tmp_path, monkeypatch):
    """Where the lock goes with neither NETSHRINK_LOCK_DIR nor XDG_RUNTIME_DIR set, inside a private temp folder."""
    monkeypatch.delenv(node_lock.LOCK_DIR_VARIABLE)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path / f"netshrink-{os.getuid()}"


def test_the_default_folder_is_made_private_and_holds_the_lock_files(default_folder):
    with node_lock.compute_slot():
        pass
    with node_lock.quiet_machine():
        pass
    assert stat.S_IMODE(default_folder.lstat().st_mode) == 0o700
    assert sorted(path.name for path in default_folder.iterdir()) == ["node.gate", "node.work"]
    assert all(path.stat().st_mode & 0o077 == 0 for path in default_folder.iterdir())


def test_a_folder_others_can_enter_is_refused(default_folder):
    default_folder.mkdir()
    default_folder.chmod(0o755)
    rule = f"lock folder {default_folder} has mode 0755; it must be a folder of yours with mode 0700"
    with pytest.raises(PermissionError, match=re.escape(rule)), node_lock.quiet_machine():
        pass


def test_a_symlink_in_place_of_the_folder_is_refused(default_folder, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    default_folder.symlink_to(target)
    with pytest.raises(PermissionError, match=re.escape(f"lock folder {default_folder} is a symlink")), node_lock.compute_slot():
        pass


def test_the_runtime_folder_is_used_when_there_is_one(default_folder, tmp_path, monkeypatch):
    runtime = tmp_path / "run"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert node_lock.lock_folder() == default_folder  # not a folder (yet): ignored
    runtime.mkdir(mode=0o700)
    with node_lock.compute_slot():
        pass
    assert (runtime / "netshrink" / "node.gate").exists()
    assert not default_folder.exists()


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
