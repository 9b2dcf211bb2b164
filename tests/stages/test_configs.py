"""params.yaml and every configs/<dataset>.yaml parse through the stages' own loaders.

A config file is only useful if `cp configs/X.yaml params.yaml && make run` gets past every
stage's params check: each section is loaded with the schema its stage uses, every model
config names a known architecture and encoder, the training matrix names known configs,
and the file has the same sections as params.yaml (so DVC's `${...}` templating works).
"""

from __future__ import annotations

import re

import pytest
import yaml

from pipeline.core.params import load_section
from pipeline.core.runs import load_model_params, load_train_params
from pipeline.data.adapters import parse_options
from pipeline.data.transforms import transform_from_params
from pipeline.ensemble import EnsembleParams
from pipeline.ensembling.params import parse_grid, parse_groups
from pipeline.evaluate import EvaluateParams
from pipeline.folds import FoldsParams
from pipeline.inference.runner import InferParams
from pipeline.inference.tta import tta_from_params
from pipeline.launch.plan import PlanParams
from pipeline.models.build import _check_arch_kwargs, _check_encoder, list_archs
from pipeline.prepare import PrepareParams
from pipeline.submission.formats import get_format
from pipeline.submit import SubmitParams

from conftest import REPO  # the repository root, defined once

FILES = [REPO / "params.yaml", *sorted((REPO / "configs").glob("*.yaml"))]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_section_loads_with_its_stage_schema(path):
    params = yaml.safe_load(path.read_text())
    reference = yaml.safe_load((REPO / "params.yaml").read_text())
    assert list(params) == list(reference)

    prepare = load_section(PrepareParams, "prepare", path)
    if prepare.dataset != "demo":
        parse_options(prepare.dataset, params["prepare"].get(prepare.dataset))
    folds = load_section(FoldsParams, "folds", path)
    train = load_train_params(path)
    assert set(train.folds) <= set(range(folds.n_folds)), "train.folds beyond folds.n_folds"
    configs = list(train.models) + [s["name"] for s in train.students]
    for name in configs:
        cfg = load_model_params(name, path)
        assert cfg.model.arch.lower() in list_archs()
        _check_encoder(cfg.model.encoder)
        _check_arch_kwargs(cfg.model.arch.lower(), cfg.model.encoder, cfg.model.arch_kwargs)
        transform_from_params(cfg.model.augment, train=True, source=f"models.{name}.augment")
    infer = load_section(InferParams, "infer", path)
    tta_from_params(infer.tta)
    ensemble = load_section(EnsembleParams, "ensemble", path)
    parse_grid(ensemble.alpha_grid, key="alpha_grid")
    parse_grid(ensemble.beta_grid, key="beta_grid")
    parse_groups(ensemble.groups)
    families = {params["models"][n].get("family", "primary") for n in configs}
    assert ensemble.primary_family in families
    submit = load_section(SubmitParams, "submit", path)
    if submit.format != "auto":
        get_format(submit.format, dataset=prepare.dataset)
    load_section(EvaluateParams, "evaluate", path)
    load_section(PlanParams, "plan", path)  # optional: absent means the defaults


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_dvc_template_resolves(path):
    """dvc.yaml's ``${a.b}`` references (outside matrix items) exist in the file: DVC fails
    to load the pipeline on the first missing one."""
    params = yaml.safe_load(path.read_text())
    refs = set(re.findall(r"\$\{([a-z_.]+)\}", (REPO / "dvc.yaml").read_text()))
    refs = {r for r in refs if not r.startswith("item.")}
    assert refs, "dvc.yaml templates nothing?"
    for ref in sorted(refs):
        node = params
        for key in ref.split("."):
            assert isinstance(node, dict) and key in node, f"{path.name}: no '{ref}' for dvc.yaml"
            node = node[key]


def test_demo_defaults_exercise_every_technique():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    train, models = params["train"], params["models"]
    assert params["prepare"]["dataset"] == "demo"
    # one seed keeps `make run` under its 10 minutes; the real-data configs train several
    assert train["seeds"] and train["students"], "a seed and a student"
    configs = train["models"] + [s["name"] for s in train["students"]]
    families = [models[n].get("family", "primary") for n in configs]
    assert "primary" in families and set(families) - {"primary"}, "S/W and A families"
    primary = (sum(models[n].get("family", "primary") == "primary" for n in train["models"])
               * len(train["seeds"])
               + sum(models[s["name"]].get("family", "primary") == "primary"
                     for s in train["students"]) * len(train["student_seeds"]))
    assert params["ensemble"]["n_strong"] < primary, "leaves members for W"
    losses = {loss["name"] for n in configs for loss in models[n]["loss"]}
    assert "ohem" in losses
    assert any(models[n].get("logit_adjust", {}).get("enabled") for n in configs)
    assert all(models[n]["swa"]["iters"] > 0 for n in configs)
    assert any(models[n].get("distill", {}).get("teacher") for n in configs)
    tta = params["infer"]["tta"]
    assert len(tta["scales"]) >= 2 and tta["flip"]


@pytest.mark.parametrize("where, value, key, shown", [
    ("optimizer", {"name": "adamw", "lr": float("nan")}, "models.fpn_r10.optimizer.lr", "nan"),
    ("loss", [{"name": "ce"}, {"name": "dice", "weight": float("inf")}],
     "models.fpn_r10.loss[1].weight", "inf"),
    ("grad_clip", float("-inf"), "models.fpn_r10.grad_clip", "-inf"),
], ids=["nested-key", "list-item", "top-level"])
def test_non_finite_numbers_are_refused_naming_the_key_path(tmp_path, where, value, key, shown):
    from pipeline.core.errors import PipelineError

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["models"]["fpn_r10"][where] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert ".nan" in path.read_text() or ".inf" in path.read_text()  # YAML's spelling
    with pytest.raises(PipelineError) as err:
        load_model_params("fpn_r10", path)
    assert str(err.value) == f"{path}: '{key}' must be a finite number, got {shown}"


def test_every_section_refuses_non_finite_numbers(tmp_path):
    from pipeline.core.errors import PipelineError

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ensemble"]["alpha_grid"]["step"] = float("nan")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError, match=r"'ensemble.alpha_grid.step' must be a finite number"):
        load_section(EnsembleParams, "ensemble", path)
