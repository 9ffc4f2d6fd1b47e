"""tests/no_skips.py, run by pytester in a pytest of its own: under HARNESS_NO_SKIPS=1 a skip fails, in a test
or as a module is collected, except a test marked may_skip; without it, skips skip."""

from __future__ import annotations

import pytest

PLUGIN = ("-p", "tests.no_skips")
IN_A_TEST = """
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("no such install")

@pytest.mark.may_skip
def test_may_skip():
    pytest.skip("no such data")
"""
AT_COLLECTION = {
    "test_imports": "import pytest\npytest.importorskip('no_such_module_at_all')\n\ndef test_never():\n    pass\n",
    "test_module_level": "import pytest\npytest.skip('no such install', allow_module_level=True)\n",
}


@pytest.fixture
def no_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_NO_SKIPS", "1")


@pytest.fixture
def skips_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HARNESS_NO_SKIPS", raising=False)  # CI sets it for the outer run


@pytest.mark.usefixtures("no_skips")
def test_a_skip_in_a_test_fails_but_a_may_skip_test_skips(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(IN_A_TEST)
    result = pytester.runpytest(*PLUGIN, "-rfs")
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_skips _*",
            "skipped where every test must run (HARNESS_NO_SKIPS=1): Skipped: no such install (*.py:7)",
            "FAILED *::test_skips*",  # CI=true adds the reason after it
            "SKIPPED * no such data",
        ]
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED


@pytest.mark.usefixtures("skips_allowed")
def test_without_the_variable_a_skip_skips(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(IN_A_TEST, **AT_COLLECTION)
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(passed=1, skipped=4)
    assert result.ret == pytest.ExitCode.OK


@pytest.mark.usefixtures("no_skips")
@pytest.mark.parametrize("module", sorted(AT_COLLECTION))
def test_a_module_skipped_as_it_is_collected_fails(pytester: pytest.Pytester, module: str) -> None:
    pytester.makepyfile(**{module: AT_COLLECTION[module]})
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [f"*ERROR collecting {module}.py*", "skipped where every test must run (HARNESS_NO_SKIPS=1): *"]
    )
    assert result.ret != pytest.ExitCode.OK
