"""One error base: every error a user can act on is an MrrpError; anything else keeps its
traceback at the command line."""

import inspect

import pytest
from click.testing import CliRunner

import mrrp_pacs.errors as errors
from mrrp_pacs.cli import main
from mrrp_pacs.config import load_config


def test_every_error_of_the_project_derives_from_one_base():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if c.__module__ == errors.__name__]
    assert len(classes) > 10
    assert all(issubclass(c, errors.MrrpError) for c in classes)


def test_errors_carry_typed_fields(tmp_path):
    bad = tmp_path / "mrrp.toml"
    bad.write_text("[dicom]\nport = 0\n")
    with pytest.raises(errors.ConfigError) as caught:
        load_config(bad, environ={})
    assert (caught.value.key, caught.value.source) == ("dicom.port", str(bad))
    assert "dicom.port = 0 is invalid" in str(caught.value)


@pytest.fixture
def failing_cases(monkeypatch):
    """`mrrp-pacs cases` with its listing replaced by one that raises what the test says."""
    def install(exc):
        def raise_it(*_args, **_kwargs):
            raise exc
        monkeypatch.setattr("mrrp_pacs.cases.list_cases", raise_it)
    return install


def test_an_mrrp_error_is_one_line_and_exit_status_1(failing_cases, tmp_path):
    failing_cases(errors.CohortError("outcomes.csv line 3: event 'x' is not 0/1"))
    result = CliRunner().invoke(main, ["cases", "--db", str(tmp_path / "db.sqlite3")])
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == "Error: outcomes.csv line 3: event 'x' is not 0/1"
    assert "Traceback" not in result.output


def test_a_bare_value_error_keeps_its_traceback(failing_cases, tmp_path):
    failing_cases(ValueError("Expected more than 1 value per channel"))  # as torch says it
    result = CliRunner().invoke(main, ["cases", "--db", str(tmp_path / "db.sqlite3")])
    assert result.exit_code == 1
    assert isinstance(result.exception, ValueError)  # not turned into a one-line message
    assert "Error: Expected" not in result.output
