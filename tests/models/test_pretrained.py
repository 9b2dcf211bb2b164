"""Tests for pipeline/models/pretrained.py and pipeline/weights.py: hub weights only on request,
offline from a weights folder, and a file of another encoder refused with its keys named."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch

from pipeline.core.errors import PipelineError
from pipeline.models.build import build_model
from pipeline.models.pretrained import hub_tag, save_encoder_weights, weights_file_name
from pipeline.weights import main as weights_main

ENCODER = "resnet18"
SPEC = {"arch": "Unet", "encoder": ENCODER, "num_classes": 3}


@pytest.fixture
def no_network(monkeypatch):
    """smp's encoder factory without downloads: hub weights come out as a seeded random init,
    and any attempt to download through create_model fails the test."""
    real = smp.encoders.get_encoder

    def offline_encoder(name, in_channels=3, depth=5, weights=None, **kwargs):
        torch.manual_seed(1234)  # "the hub's weights": the same tensors on every call
        return real(name, in_channels=in_channels, depth=depth, weights=None, **kwargs)

    real_create = smp.create_model

    def create(arch, **kwargs):
        assert kwargs.get("encoder_weights") is None, "tried to download"
        return real_create(arch, **kwargs)

    monkeypatch.setattr(smp.encoders, "get_encoder", offline_encoder)
    monkeypatch.setattr(smp, "create_model", create)


def test_hub_tags():
    assert hub_tag("imagenet") == hub_tag("hub") == hub_tag("hub:imagenet") == "imagenet"
    assert hub_tag("hub:ssl") == "ssl"
    assert hub_tag("") is hub_tag(None) is hub_tag("/weights/enc.pth") is None


def test_weights_dir_stands_in_for_the_hub_without_any_download(tmp_path, no_network):
    saved = save_encoder_weights(ENCODER, out=tmp_path / weights_file_name(ENCODER))
    assert saved["tensors"] > 0
    model = build_model(**SPEC, weights="imagenet", weights_dir=tmp_path)
    hub = smp.encoders.get_encoder(ENCODER, weights="imagenet")  # the same seeded tensors
    for key, value in hub.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(model.encoder.state_dict()[key], value), key
    assert model.model_config["weights"] == "imagenet"  # the spec names the weights, not a path
    fresh = build_model(**SPEC)  # random init differs
    assert not torch.equal(fresh.encoder.conv1.weight, model.encoder.conv1.weight)


def test_a_weights_dir_without_the_file_says_how_to_make_it(tmp_path, no_network):
    with pytest.raises(PipelineError, match=r"resnet18\.imagenet\.pth.*pipeline/weights\.py resnet18"):
        build_model(**SPEC, weights="imagenet", weights_dir=tmp_path)
    with pytest.raises(PipelineError, match="weights_dir not found"):
        build_model(**SPEC, weights="imagenet", weights_dir=tmp_path / "nowhere")


def test_weights_of_another_encoder_are_refused_naming_missing_and_unexpected_keys(tmp_path,
                                                                                  no_network):
    other = smp.encoders.get_encoder("resnet34", weights=None)
    path = tmp_path / weights_file_name(ENCODER)
    torch.save({f"encoder.{k}": v for k, v in other.state_dict().items()}, path)
    with pytest.raises(PipelineError, match=r"does not fit the model's encoder: \d+ encoder "
                                            r"tensors missing.*\d+ unexpected keys \(e\.g\. encoder"):
        build_model(**SPEC, weights="imagenet", weights_dir=tmp_path)
    with pytest.raises(PipelineError, match="does not fit the model's encoder"):
        build_model(**SPEC, weights=str(path))  # the same file as a plain PATH


def test_weights_script_writes_the_name_the_folder_is_searched_for(tmp_path, no_network, capsys):
    saved = weights_main([ENCODER, "--dir", str(tmp_path / "w")])
    assert saved["path"] == str(tmp_path / "w" / "resnet18.imagenet.pth")
    assert "tensors of encoder 'resnet18'" in capsys.readouterr().out
    build_model(**SPEC, weights="imagenet", weights_dir=tmp_path / "w")  # loads, no download
    with pytest.raises(PipelineError, match="exactly one of --out FILE and --dir DIR"):
        weights_main([ENCODER])


def test_hub_failure_is_one_line_that_says_it_needs_the_network(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(smp.encoders, "get_encoder", broken)
    with pytest.raises(PipelineError, match="cannot get 'imagenet' weights of encoder "
                                            "'resnet18'.*needs the network"):
        save_encoder_weights(ENCODER, out=tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()
