"""The reference-package helper: a missing reference fails under the CI flag, else skips."""

import pytest
import references


def test_missing_reference_fails_under_the_ci_flag(monkeypatch):
  monkeypatch.setenv(references.FLAG, "1")
  with pytest.raises(pytest.fail.Exception, match=r"'torch_not_installed' is missing.*install "
                                                  r"torch_not_installed"):
    references.require("torch_not_installed")


def test_missing_reference_skips_without_the_flag(monkeypatch):
  monkeypatch.delenv(references.FLAG, raising=False)
  with pytest.raises(pytest.skip.Exception, match=r"install transformers \(pip install -e"):
    references.require("transformers.no_such_module")


def test_present_reference_is_returned(monkeypatch):
  monkeypatch.setenv(references.FLAG, "1")
  assert references.require("json").dumps([1]) == "[1]"
