"""The CPU rate behind `lorakit plan`'s time: best of several runs, cached only from a quiet machine.

The benchmark itself and the load average are replaced by fakes, so these tests decide what the
machine "measures" and how busy it "is".
"""

from __future__ import annotations

import json

import pytest

from lorakit.plan import devices


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A fake machine: set .load and .rates; .measured counts benchmark runs; .clock is time.time."""

    class Machine:
        load = 0.0
        rates = (100e9, 5e-6)
        measured = 0
        clock = 1_000_000.0

    def measure():
        Machine.measured += 1
        return Machine.rates

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(devices, "_load_per_core", lambda: Machine.load)
    monkeypatch.setattr(devices, "_measure_cpu_rates", measure)
    monkeypatch.setattr(devices.time, "time", lambda: Machine.clock)
    return Machine


def test_a_quiet_measurement_is_cached_and_reused(machine, tmp_path):
    assert devices.cpu_rates() == (100e9, 5e-6)
    machine.rates = (1e9, 1e-3)  # a second benchmark would see this: it must not run
    assert devices.cpu_rates() == (100e9, 5e-6) and machine.measured == 1
    (entry,) = json.loads((tmp_path / "cpu_rates.json").read_text()).values()
    assert entry["quiet"] and entry["measured_at"] == machine.clock


def test_a_busy_measurement_is_not_trusted_and_the_best_is_kept(machine):
    machine.load = 2 * devices.QUIET_LOAD_PER_CORE
    machine.rates = (30e9, 20e-6)  # slowed down by the other jobs
    assert devices.cpu_rates() == (30e9, 20e-6)
    machine.rates = (60e9, 9e-6)
    assert devices.cpu_rates() == (60e9, 9e-6) and machine.measured == 2  # measured again: it was busy
    machine.rates = (45e9, 12e-6)  # busier still: the best seen so far stays
    assert devices.cpu_rates() == (60e9, 9e-6) and machine.measured == 3
    machine.load = 0.0
    machine.rates = (100e9, 5e-6)  # quiet at last: this one is cached for good
    assert devices.cpu_rates() == (100e9, 5e-6) and machine.measured == 4
    assert devices.cpu_rates() == (100e9, 5e-6) and machine.measured == 4


def test_an_old_or_old_format_entry_is_measured_again(machine, tmp_path):
    devices.cpu_rates()
    machine.clock += devices.CPU_RATE_MAX_AGE_DAYS * 86400 + 1
    machine.rates = (80e9, 6e-6)  # an expired entry is replaced, not combined
    assert devices.cpu_rates() == (80e9, 6e-6) and machine.measured == 2
    path = tmp_path / "cpu_rates.json"
    key = next(iter(json.loads(path.read_text())))
    path.write_text(json.dumps({key: [3.8e9, 1e-4]}))  # the format cached before the load check
    machine.rates = (90e9, 5e-6)
    assert devices.cpu_rates() == (90e9, 5e-6) and machine.measured == 3


def test_without_the_cache_it_measures_every_time(machine, tmp_path):
    devices.cpu_rates(use_cache=False)
    devices.cpu_rates(use_cache=False)
    assert machine.measured == 2 and not (tmp_path / "cpu_rates.json").exists()


def test_best_rate_takes_the_fastest_run():
    # a fake clock: each call of `run` takes the next duration; 3 runs of at least 1 s each
    durations = iter([0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 2.0])
    now = [0.0]

    def run():
        now[0] += next(durations)

    rate = devices._best_rate(run, seconds=1.0, repeats=3, timer=lambda: now[0])
    assert rate == pytest.approx(4.0)  # the second run: 4 calls in 1 s (the others: 2/s and 0.5/s)


def test_load_per_core_reads_the_load_average(monkeypatch):
    monkeypatch.setattr(devices.os, "getloadavg", lambda: (3.0, 1.0, 0.5))
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 4)
    assert devices._load_per_core() == pytest.approx(0.75)


def test_the_plan_says_when_the_cpu_was_busy(machine):
    machine.load = 2 * devices.QUIET_LOAD_PER_CORE
    assert "while other jobs ran: the times are upper bounds" in devices.gpu_spec("cpu").label
    machine.load = 0.0
    assert devices.gpu_spec("cpu").label.endswith("rates measured)")
