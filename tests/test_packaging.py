"""What a project people can adopt carries: a license, citation metadata that agree with
pyproject.toml, and a Python range that admits the versions the dependencies support."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# CFF 1.2.0's required keys (schema.json "required"), and those asked of this project
CFF_REQUIRED = {"cff-version", "message", "title", "authors"}


def test_license_is_mit_and_pyproject_says_so():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the bnexp authors" in text
    assert "Permission is hereby granted, free of charge" in text
    assert PROJECT["license"] == {"text": "MIT"}
    assert PROJECT["authors"] == [{"name": "the bnexp authors"}]


def test_citation_cff_agrees_with_pyproject():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert CFF_REQUIRED <= set(cff)
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT"
    assert str(cff["version"]) == PROJECT["version"]
    assert str(cff["date-released"]) == "2026-12-05"
    assert all("name" in a or "family-names" in a for a in cff["authors"])


def test_citation_cff_is_valid_against_the_cff_schema():
    """The full schema check, where cffconvert (which ships the schema) is installed."""
    validate = pytest.importorskip("cffconvert.cli.validate_or_write_output")
    from cffconvert.cli.create_citation import create_citation

    citation = create_citation(str(ROOT / "CITATION.cff"), None)
    validate.validate_or_write_output(None, "apalike", True, citation)  # raises when invalid


@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13"])
def test_requires_python_admits_the_supported_versions(version):
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(PROJECT["requires-python"]).contains(version + ".0")
