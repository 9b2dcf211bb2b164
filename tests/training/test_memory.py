"""Whether a run's batch fits (pipeline.training.memory): split across DDP ranks, and in the
memory the device has free, refused before the run writes anything."""

from __future__ import annotations

import pytest
import torch

from pipeline.training import memory

from test_loop import _cfg, _train


def test_batch_size_is_the_global_batch_split_across_ranks(demo_workspace):
    from pipeline.core.errors import PipelineError

    cfg = _cfg(demo_workspace, batch_size=6)
    assert memory.check_batch(cfg, train_frames=6) == 6
    assert memory.check_batch(cfg, train_frames=20, world_size=3) == 2
    with pytest.raises(PipelineError, match=r"models.tiny.batch_size \(6\) is the global batch "
                                            r"of a step and must divide by the 4 DDP processes"):
        memory.check_batch(cfg, train_frames=20, world_size=4)
    with pytest.raises(PipelineError, match=r"models.tiny.batch_size \(6\) is larger than the 5 "
                                            r"training frames"):
        memory.check_batch(cfg, train_frames=5)


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_any_output(demo_workspace, tmp_path,
                                                                        monkeypatch):
    from pipeline.core.errors import PipelineError
    from pipeline.models.build import build_model

    ws = demo_workspace
    model = build_model(arch="Unet", encoder="tu-test_resnet", num_classes=10,
                        decoder_channels=[16, 16, 8, 8, 8])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    small, large = (memory.activation_bytes(model, hw) for hw in ((64, 64), (256, 512)))
    assert 0 < small and large == pytest.approx(32 * small)  # measured at 64x64, scaled
    assert torch.equal(rng, torch.get_rng_state())  # the probe draws nothing, changes nothing
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    monkeypatch.setattr(memory, "available_memory", lambda device: 2 ** 20)  # 1 MiB
    with pytest.raises(PipelineError) as err:
        _train(ws, _cfg(ws), tmp_path / "runs")
    assert str(err.value).startswith("models.tiny.batch_size: 4 image(s) of 32x32 per step need "
                                     "about ")
    assert "more than the 1.0 MiB free on cpu; lower models.tiny.batch_size or " \
           "models.tiny.augment.crop" in str(err.value)
    assert not (tmp_path / "runs").exists()
