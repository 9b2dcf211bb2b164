"""Every params key a dvc.yaml stage lists exists in each config file.

DVC hashes a stage's ``params:`` after running it and stops with "Parameters '...' are missing
from 'params.yaml'" (MissingParamsError) when one is absent, so `cp configs/X.yaml params.yaml
&& dvc repro` would fail after its first stage that names a key the file lacks.
"""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO

FILES = [REPO / "params.yaml", *sorted((REPO / "configs").glob("*.yaml"))]


def stage_param_keys() -> set[str]:
    """Dotted keys of params.yaml that dvc.yaml's stages list (templated ones left out)."""
    keys = set()
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for entry in stage.get("params") or []:
            if isinstance(entry, str) and "${" not in entry:
                keys.add(entry)
    return keys


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_stage_param_key_is_in_the_file(path):
    params = yaml.safe_load(path.read_text())
    missing = []
    for key in sorted(stage_param_keys()):
        node = params
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    assert not missing, f"{path.name} lacks {', '.join(missing)}"
