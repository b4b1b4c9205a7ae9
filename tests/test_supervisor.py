"""`supervisor.py`'s pure parts: how many workers `auto` means, how a worker's end is told. (The supervisor
at work, with real processes: test_workers.py.)"""

from __future__ import annotations

import os
import signal

import pytest

from manaproxy.supervisor import describe_exit, worker_count


def test_auto_is_one_worker_per_usable_cpu_and_a_count_is_itself() -> None:
    assert worker_count("auto") == len(os.sched_getaffinity(0))
    assert worker_count(3) == 3


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (0, "exited with code 0"),
        (1, "exited with code 1"),
        (-signal.SIGKILL, "was killed by SIGKILL"),
        (-99, "signal 99"),
    ],
)
def test_a_worker_end_is_told_in_words(code: int, words: str) -> None:
    assert words in describe_exit(code)
