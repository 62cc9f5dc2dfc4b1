"""book/conftest.py: nbval starts a chapter's kernel again when it died before it replied."""

import importlib.util
from pathlib import Path

import nbval.kernel
import pytest

CONFTEST = Path(__file__).resolve().parent.parent / "book" / "conftest.py"


def _load_with(monkeypatch, start):
    """book/conftest.py loaded over a fake nbval start (restored after the test)."""
    monkeypatch.setattr(nbval.kernel, "start_new_kernel", start)
    spec = importlib.util.spec_from_file_location("book_conftest", CONFTEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert nbval.kernel.start_new_kernel is module.start_new_kernel
    return module


def test_a_kernel_that_died_at_startup_is_started_again(monkeypatch):
    calls = []

    def start(**kwargs):
        calls.append(kwargs)
        if len(calls) < 3:
            raise RuntimeError("Kernel died before replying to kernel_info")
        return "km", "kc"

    module = _load_with(monkeypatch, start)
    with pytest.warns(UserWarning, match="starting it again"):
        assert module.start_new_kernel(kernel_name="python3") == ("km", "kc")
    assert calls == [{"kernel_name": "python3"}] * 3


def test_it_gives_up_after_three_deaths_and_never_retries_other_errors(monkeypatch):
    calls = []

    def dies(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("Kernel died before replying to kernel_info")

    module = _load_with(monkeypatch, dies)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="died"):
        module.start_new_kernel()
    assert len(calls) == module.ATTEMPTS == 3

    def times_out(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("Kernel didn't respond in 60 seconds")

    calls.clear()
    module = _load_with(monkeypatch, times_out)
    with pytest.raises(RuntimeError, match="respond"):
        module.start_new_kernel()
    assert len(calls) == 1
