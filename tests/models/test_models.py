"""Model registry, cosine head with logit adjustment, and loading local weights."""

from __future__ import annotations

import json
import math

import pytest
import segmentation_models_pytorch as smp
import torch

from pipeline.core.errors import PipelineError
from pipeline.models.build import build_model, list_archs, list_encoders, load_weights, model_config
from pipeline.models.prior import CosineClassifier, PriorAdjustedConv
from pipeline.models.wrappers import to_channels_last

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
PRIOR = [100.0, 10.0, 1.0]




def _unet(**kwargs):
    kwargs.setdefault("decoder_channels", [16, 16, 8, 8, 8])  # small and fast on a CPU
    return build_model(arch="unet", encoder="resnet18", num_classes=3, **kwargs)


def _out(model, x=X):
    with torch.no_grad():
        return model.eval()(x)


# ----------------------------------------------------------------------------- names
def test_unknown_arch_lists_valid_names():
    with pytest.raises(PipelineError, match="unknown arch 'unett'") as err:
        build_model(arch="unett", encoder="resnet18", num_classes=3)
    for name in ("unet", "fpn", "deeplabv3plus", "segformer"):
        assert name in str(err.value)
    assert set(list_archs()) == set(smp.MODEL_ARCHITECTURES_MAPPING)


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(PipelineError, match="unknown encoder 'resnet19'") as err:
        build_model(arch="unet", encoder="resnet19", num_classes=3)
    assert "resnet18" in str(err.value) and "mit_b0" in str(err.value)
    assert "resnet18" in list_encoders() and "tu-resnet18" in list_encoders(include_timm=True)


def test_timm_typo_suggests_close_matches():
    with pytest.raises(PipelineError, match="timm.list_models") as err:
        build_model(arch="unet", encoder="tu-resnet19", num_classes=3)
    assert "tu-resnet18" in str(err.value)
    assert len(str(err.value)) < 400  # close matches, not a thousand names


def test_unknown_arch_key_and_bad_combination_are_named():
    with pytest.raises(PipelineError, match="'decoder_chanels'.*decoder_channels"):
        _unet(decoder_chanels=[8, 8, 8, 8, 8])
    with pytest.raises(PipelineError, match="dpt"):
        build_model(arch="dpt", encoder="resnet18", num_classes=3)


def test_timm_encoder_builds_offline_with_random_init():
    model = build_model(arch="fpn", encoder="tu-resnet18", num_classes=5)
    assert _out(model).shape == (1, 5, 64, 64)


def test_config_dict_rebuilds_the_same_model():
    model = _unet(decoder_channels=[32, 16, 8, 8, 8], logit_adjust={"prior": PRIOR})
    cfg = json.loads(json.dumps(model.model_config))  # plain data only
    assert cfg == model_config(**cfg)
    rebuilt = build_model(**cfg)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(_out(model), _out(rebuilt))
    assert math.isclose(sum(cfg["logit_adjust"]["prior"]), 1.0)


# ----------------------------------------------------------------------------- cosine head
def test_cosine_head_adds_prior_in_train_mode_only():
    head = CosineClassifier(8, 3, scale=16.0, tau=0.5, prior=PRIOR)
    feats = torch.randn(2, 8, 5, 5)
    train, evald = head.train()(feats), head.eval()(feats)
    pi = torch.tensor(PRIOR) / sum(PRIOR)
    assert torch.allclose(train - evald, (0.5 * pi.log()).view(1, 3, 1, 1).expand_as(train), atol=1e-5)
    assert evald.abs().max() <= 16.0 + 1e-4
    assert torch.allclose(evald, head.cosine(feats))


def test_cosine_logits_are_bounded_by_scale_and_scale_invariant():
    head = CosineClassifier(8, 4, scale=5.0, tau=0.0, prior=[1, 1, 1, 1]).eval()
    feats = torch.randn(3, 8, 4, 4) * 100
    out = head(feats)
    assert out.abs().max() <= 5.0 + 1e-4
    assert torch.allclose(head(feats * 0.01), out, atol=1e-4)
    # the class whose weight points along the feature gets exactly +s
    with torch.no_grad():
        head.weight[2] = feats[0, :, 0, 0].view(8, 1, 1) * 3
    assert torch.isclose(head(feats)[0, 2, 0, 0], torch.tensor(5.0), atol=1e-4)


def test_keep_prior_at_eval_keeps_the_bias():
    head = CosineClassifier(8, 3, scale=16.0, tau=1.0, prior=PRIOR, keep_prior_at_eval=True)
    feats = torch.randn(1, 8, 3, 3)
    assert torch.allclose(head.train()(feats), head.eval()(feats))


def test_whole_model_train_minus_eval_is_the_prior_bias():
    tau = 0.3
    model = _unet(logit_adjust={"tau": tau, "prior": PRIOR}).eval()
    assert isinstance(model.segmentation_head[0], CosineClassifier)
    with torch.no_grad():
        evald = model(X)
        model.segmentation_head.train()  # decoder BN stays in eval: only the head differs
        train = model(X)
    pi = torch.tensor(PRIOR) / sum(PRIOR)
    assert torch.allclose(train - evald, (tau * pi.log()).view(1, 3, 1, 1).expand_as(evald), atol=1e-4)
    assert "segmentation_head.0.prior_bias" not in model.state_dict()  # rebuilt from config


def test_linear_head_is_smps_conv_plus_the_prior_bias_in_train_mode():
    tau = 0.3
    plain = _unet()
    torch.manual_seed(0)
    model = _unet(logit_adjust={"tau": tau, "prior": PRIOR, "head": "linear"})
    head = model.segmentation_head[0]
    assert isinstance(head, PriorAdjustedConv) and isinstance(head, torch.nn.Conv2d)
    # the state dict is a plain smp model's: same keys and shapes, so weights move both ways
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(model.state_dict())
    assert torch.equal(_out(model), _out(plain))  # eval: no bias
    with torch.no_grad():
        model.eval().segmentation_head.train()
        train = model(X)
    pi = torch.tensor(PRIOR) / sum(PRIOR)
    assert torch.allclose(train - _out(plain), (tau * pi.log()).view(1, 3, 1, 1).expand_as(train),
                          atol=1e-4)
    kept = _unet(logit_adjust={"tau": tau, "prior": PRIOR, "head": "linear",
                               "keep_prior_at_eval": True})
    kept.load_state_dict(model.state_dict())
    assert torch.allclose(_out(kept), train, atol=1e-5)
    rebuilt = build_model(**model.model_config)  # the config alone names the head
    rebuilt.load_state_dict(model.state_dict())
    assert isinstance(rebuilt.segmentation_head[0], PriorAdjustedConv)
    assert torch.equal(_out(rebuilt), _out(model))


def test_logit_adjust_head_defaults_to_cosine_and_typos_list_the_heads():
    assert _unet(logit_adjust={"prior": PRIOR}).model_config["logit_adjust"]["head"] == "cosine"
    with pytest.raises(PipelineError, match="linaer.*cosine.*linear"):
        _unet(logit_adjust={"prior": PRIOR, "head": "linaer"})


def test_logit_adjust_spec_is_checked():
    with pytest.raises(PipelineError, match="3 entries for 4 classes"):
        build_model(arch="unet", encoder="resnet18", num_classes=4, logit_adjust={"prior": PRIOR})
    with pytest.raises(PipelineError, match="logit_adjust.tua"):
        _unet(logit_adjust={"tua": 1.0, "prior": PRIOR})
    with pytest.raises(PipelineError, match="prior"):
        _unet(logit_adjust={"tau": 1.0})
    per_frame = [[50, 5, 0], [50, 5, 1]]  # [frames, C] as read_class_counts gives
    assert _unet(logit_adjust={"prior": per_frame}).model_config["logit_adjust"]["prior"] == \
        pytest.approx([p / sum(PRIOR) for p in PRIOR])


# ----------------------------------------------------------------------------- local weights
def test_whole_model_file_gives_identical_outputs(tmp_path):
    src = _unet()
    path = tmp_path / "whole.pt"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)  # DDP-style keys
    loaded = _unet(weights=str(path))
    assert torch.equal(_out(src), _out(loaded))
    assert loaded.model_config["weights"] == str(path)


@pytest.mark.parametrize("prefix", ["", "encoder."])
def test_encoder_only_file_loads_the_encoder_only(tmp_path, prefix):
    src, fresh = _unet(), _unet()
    path = tmp_path / "enc.pt"
    torch.save({prefix + k: v for k, v in src.encoder.state_dict().items()}, path)
    report = load_weights(fresh, path)
    assert report["encoder_only"] and not report["unexpected"] and not report["mismatched"]
    for key, value in src.state_dict().items():
        if key.startswith("encoder.") and value.is_floating_point():
            assert torch.equal(fresh.state_dict()[key], value), key
    assert not torch.equal(fresh.segmentation_head[0].weight, src.segmentation_head[0].weight)


def test_raw_timm_state_dict_loads_into_a_tu_encoder(tmp_path):
    src = build_model(arch="fpn", encoder="tu-resnet18", num_classes=3)
    path = tmp_path / "timm.pt"
    torch.save(src.encoder.model.state_dict(), path)
    report = load_weights(build_model(arch="fpn", encoder="tu-resnet18", num_classes=3), path)
    assert report["encoder_only"] and report["loaded"] == len(src.encoder.state_dict())


def test_unmatched_corrupt_or_missing_weights_name_the_file(tmp_path):
    nothing = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, nothing)
    with pytest.raises(PipelineError, match="other.pt: no tensor matches"):
        _unet(weights=str(nothing))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(PipelineError, match="corrupt.pt: not a readable weights file"):
        _unet(weights=str(corrupt))
    with pytest.raises(PipelineError, match="missing.pt: weights file not found"):
        _unet(weights=str(tmp_path / "missing.pt"))


def test_hub_weights_only_on_request_and_offline_failure_is_explained(monkeypatch):
    seen = []

    def fake_create_model(arch, **kwargs):
        seen.append(kwargs["encoder_weights"])
        if kwargs["encoder_weights"] is not None:
            raise OSError("no network")
        return smp.Unet(**kwargs)

    monkeypatch.setattr(smp, "create_model", fake_create_model)
    _unet()
    with pytest.raises(PipelineError, match="hub:imagenet.*network"):
        _unet(weights="hub:imagenet")
    assert seen == [None, "imagenet"]
    with pytest.raises(PipelineError, match="hub:ssl"):
        _unet(weights="hub:nope")


def test_channels_last_converts_conv_weights():
    model = to_channels_last(_unet())
    assert model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert _out(model).shape == (1, 3, 64, 64)


def test_partial_match_warns_and_names_what_was_skipped(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(_unet().state_dict(), path)  # 3x3 conv head with a bias
    with pytest.warns(UserWarning, match="1 shape mismatches, 1 unexpected"):
        report = load_weights(_unet(logit_adjust={"prior": PRIOR}), path)
    assert report["mismatched"] == ["segmentation_head.0.weight"]
    assert report["unexpected"] == ["segmentation_head.0.bias"]


@pytest.mark.gpu
def test_cosine_head_under_fp16_autocast_on_cuda():
    model = _unet(logit_adjust={"prior": PRIOR, "scale": 16.0}).cuda().eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        out = model(X.cuda())
    assert torch.isfinite(out).all() and out.abs().max() <= 16.0 + 0.05


@pytest.mark.parametrize("head", ["cosine", "linear"])
def test_without_prior_gives_the_bare_logits_and_add_prior_puts_the_bias_back(head):
    from pipeline.models.prior import add_prior, without_prior

    model = _unet(logit_adjust={"tau": 0.3, "prior": PRIOR, "head": head}).eval()
    model.segmentation_head.train()  # decoder BN in eval: only the head's mode differs
    with torch.no_grad():
        adjusted = model(X)
        with without_prior(model):
            bare = model(X)
        assert torch.equal(bare, _out(model.eval()))  # train mode, no bias == eval mode
        model.segmentation_head.train()
        assert torch.equal(add_prior(model, bare), adjusted)  # bit for bit (Unet's head)
        assert torch.equal(model(X), adjusted)  # the block restored the bias
        model.eval()
        assert torch.equal(add_prior(model, bare), bare)  # eval mode: nothing to add
    plain = _unet()
    expected = _out(plain)
    with without_prior(plain):  # no logit-adjusted head: no effect
        assert torch.equal(_out(plain), expected)
