"""The technique ledger's arithmetic on hand-made metrics: gains are paired differences, the
noise band is the largest seed spread of one model, verdicts follow the band, and nothing is
invented where a comparison was not measured."""

from __future__ import annotations

import pytest

from pipeline.reporting.ledger import (NO_BAND, MemberScores, build_ledger, format_ledger, noise_band,
                                       switch_pairs, verdict)

BASE = {"arch": "Unet", "encoder": "tu-resnet10t", "iters": 100,
        "loss": [{"name": "ohem", "thresh": 0.7, "min_kept": 1000}]}
MODELS = {
    "unet": {**BASE, "logit_adjust": {"enabled": True, "tau": 0.3}},
    "unet_nola": dict(BASE),                                            # LA off, else equal
    "unet_ce": {**BASE, "loss": [{"name": "ce"}], "logit_adjust": {"enabled": True, "tau": 0.3}},
    "unet_kd": {**BASE, "iters": 60, "logit_adjust": {"enabled": True, "tau": 0.3},
                "distill": {"teacher": "unet"}},
    "fpn": {"arch": "FPN", "encoder": "tu-resnet10t", "iters": 100, "loss": [{"name": "ce"}]},
}


def members() -> dict[str, MemberScores]:
    return {
        "unet_s0": MemberScores("unet", 0, oof={"last": 0.40, "swa": 0.43, "single": 0.42, "tta": 0.45},
                                test={"tta": 0.50}),
        "unet_s1": MemberScores("unet", 1, oof={"last": 0.41, "swa": 0.40, "single": 0.41, "tta": 0.43},
                                test={"tta": 0.47}),
        "unet_nola_s0": MemberScores("unet_nola", 0, oof={"tta": 0.44}),
        "unet_ce_s0": MemberScores("unet_ce", 0, oof={"tta": 0.30}),
        "unet_kd_s0": MemberScores("unet_kd", 0, oof={"tta": 0.38}, test={"tta": 0.49}),
        "fpn_s0": MemberScores("fpn", 0, oof={"last": 0.30, "swa": 0.31, "tta": 0.33}),
    }


def rows_of(ledger: dict, technique: str, split: str = "oof") -> list[dict]:
    return [r for r in ledger["rows"] if r["technique"] == technique and r["split"] == split]


def test_noise_band_is_the_largest_seed_spread_of_one_model():
    ms = members()
    assert noise_band(ms) == pytest.approx(0.02)           # unet: 0.45 vs 0.43
    assert noise_band(ms, split="test") == pytest.approx(0.03)
    ms["fpn_s1"] = MemberScores("fpn", 1, oof={"tta": 0.28})  # fpn spreads 0.05: the widest
    assert noise_band(ms) == pytest.approx(0.05)
    assert noise_band({"a_s0": ms["unet_s0"]}) is None


def test_verdicts_follow_the_band():
    assert verdict(0.03, 0.02) == "helps"
    assert verdict(-0.03, 0.02) == "hurts"
    assert verdict(0.02, 0.02) == "within noise" and verdict(-0.01, 0.02) == "within noise"
    assert verdict(0.5, None) == NO_BAND
    assert verdict(None, 0.02) == "not measured"


def test_per_member_gains_and_their_mean():
    ledger = build_ledger(members=members(), models=MODELS)
    swa = {r["subject"]: r for r in rows_of(ledger, "SWA vs last")}
    assert set(swa) == {"unet_s0", "unet_s1", "fpn_s0", "mean of 3 members"}
    assert swa["unet_s0"]["gain"] == pytest.approx(0.03) and swa["unet_s0"]["verdict"] == "helps"
    assert swa["unet_s1"]["gain"] == pytest.approx(-0.01) and swa["unet_s1"]["verdict"] == "within noise"
    assert swa["mean of 3 members"]["gain"] == pytest.approx((0.03 - 0.01 + 0.01) / 3)
    assert swa["unet_s0"]["baseline"] == 0.40 and swa["unet_s0"]["with"] == 0.43
    tta = {r["subject"]: r for r in rows_of(ledger, "TTA vs one view")}
    assert set(tta) == {"unet_s0", "unet_s1", "mean of 2 members"}   # fpn has no one-view score
    assert tta["unet_s0"]["gain"] == pytest.approx(0.03)


def test_student_against_its_own_teacher_on_both_splits():
    ms = members()
    ledger = build_ledger(members=ms, teachers={"unet_kd_s0": "unet_s0"}, models=MODELS)
    (oof,) = rows_of(ledger, "student vs teacher")
    assert oof["gain"] == pytest.approx(0.38 - 0.45) and oof["verdict"] == "hurts"
    (test,) = rows_of(ledger, "student vs teacher", "test")
    assert test["gain"] == pytest.approx(-0.01) and test["verdict"] == "within noise"  # band 0.03


def test_ensemble_steps_each_over_the_one_before():
    oof = {"best_single": 0.45, "uniform_mean": 0.43, "S": 0.46, "S_W": 0.46, "S_W_A": 0.50}
    ledger = build_ledger(members=members(), ensemble={"oof": oof})
    rows = {r["subject"]: r for r in rows_of(ledger, "ensemble")}
    assert rows["uniform mean over best single"]["gain"] == pytest.approx(-0.02)
    assert rows["P_S over uniform mean"]["gain"] == pytest.approx(0.03)
    assert rows["P_S + a P_W over P_S"]["gain"] == 0.0
    assert rows["P_S + a P_W over P_S"]["verdict"] == "within noise"
    assert rows["P_S + a P_W + b P_A over P_S + a P_W"]["gain"] == pytest.approx(0.04)
    assert rows["P_S + a P_W + b P_A over best single"]["gain"] == pytest.approx(0.05)
    assert len(rows) == 5
    (test,) = rows_of(ledger, "ensemble", "test")  # members have test scores, rows do not
    assert test["gain"] is None and test["verdict"] == "not measured"
    no_test = {n: MemberScores(m.model, m.seed, oof=m.oof) for n, m in members().items()}
    ledger = build_ledger(members=no_test, ensemble={"oof": oof})
    assert not [r for r in ledger["rows"] if r["split"] == "test"]  # nothing labelled: no table


def test_switches_only_where_two_configs_differ_in_nothing_else():
    assert switch_pairs(MODELS, "logit adjustment") == [("unet", "unet_nola")]
    assert switch_pairs(MODELS, "OHEM") == [("unet", "unet_ce")]
    ledger = build_ledger(members=members(), models=MODELS)
    (la,) = rows_of(ledger, "logit adjustment")
    assert la["subject"] == "unet vs unet_nola (seed 0)" and la["gain"] == pytest.approx(0.01)
    (ohem,) = rows_of(ledger, "OHEM")
    assert ohem["gain"] == pytest.approx(0.15) and ohem["verdict"] == "helps"
    # the demo's kind of params: no such pair -> "not measured", never a number
    only = {k: MODELS[k] for k in ("unet", "unet_kd", "fpn")}
    ledger = build_ledger(members=members(), models=only)
    for technique in ("logit adjustment", "OHEM"):
        (row,) = rows_of(ledger, technique)
        assert row["gain"] is None and row["verdict"] == "not measured"


def test_markdown_states_the_band_and_every_verdict():
    ledger = build_ledger(members=members(), models=MODELS, teachers={"unet_kd_s0": "unet_s0"},
                          ensemble={"oof": {"best_single": 0.45, "S_W_A": 0.5}})
    text = "\n".join(format_ledger(ledger))
    assert "noise band +/- 2.00 points" in text and "noise band +/- 3.00 points" in text
    assert "| SWA vs last | unet_s0 | 40.00 | 43.00 | +3.00 | helps |" in text
    assert text.count("| not measured") >= 1


def test_rare_sampling_pairs_configs_that_differ_only_in_sampling():
    rare = {**MODELS["unet"], "sampling": {"frames": "rare", "temperature": 0.01}}
    crops = {**MODELS["unet"], "sampling": {"frames": "uniform", "crops": "rare", "crop_share": 0.5}}
    uniform = {**MODELS["unet"], "sampling": {"frames": "uniform", "crops": "uniform"}}
    models = {**MODELS, "unet_rare": rare, "unet_crops": crops, "unet_uniform": uniform}
    pairs = switch_pairs(models, "rare-class sampling")
    # each rare config pairs with both uniform twins (explicit uniform, or no section at all)
    assert pairs == [("unet_crops", "unet"), ("unet_crops", "unet_uniform"),
                     ("unet_rare", "unet"), ("unet_rare", "unet_uniform")]
    other = {**rare, "iters": 999}  # differs in more than sampling: no pair
    assert switch_pairs({"a": other, "unet": MODELS["unet"]}, "rare-class sampling") == []


def test_rare_frames_and_rare_crops_are_measured_with_the_other_draw_held():
    crops = {**MODELS["unet"], "sampling": {"crops": "rare"}}
    both = {**MODELS["unet"], "sampling": {"frames": "rare", "temperature": 0.01,
                                           "crops": "rare", "crop_share": 0.5}}
    hot = {**both, "sampling": {**both["sampling"], "temperature": 0.1}}
    models = {"unet": MODELS["unet"], "unet_rc": crops, "unet_rfc": both, "unet_rfc_hot": hot}
    # rare frames added on top of rare crops (crop_share 0.5 is the default: the same crops)
    assert switch_pairs(models, "rare frames") == [("unet_rfc", "unet_rc"),
                                                   ("unet_rfc_hot", "unet_rc")]
    assert switch_pairs(models, "rare crops") == [("unet_rc", "unet")]
    assert switch_pairs(models, "rare-class sampling") == [
        ("unet_rc", "unet"), ("unet_rfc", "unet"), ("unet_rfc_hot", "unet")]
    scores = {"unet_s0": MemberScores(model="unet", seed=0, oof={"tta": 0.40}),
              "unet_rc_s0": MemberScores(model="unet_rc", seed=0, oof={"tta": 0.41}),
              "unet_rfc_s0": MemberScores(model="unet_rfc", seed=0, oof={"tta": 0.43})}
    ledger = build_ledger(members=scores, models=models)
    (frames,) = rows_of(ledger, "rare frames")
    assert frames["subject"] == "unet_rfc vs unet_rc (seed 0)"
    assert frames["gain"] == pytest.approx(0.02)
    (crops_row,) = rows_of(ledger, "rare crops")
    assert crops_row["gain"] == pytest.approx(0.01)


def test_ema_against_last_on_the_same_folds():
    from pipeline.reporting.ledger import ema_scores

    # a fold without an EMA score is left out of both means: the pair stays on the same frames
    folds = [{"last_miou": 0.40, "ema_miou": 0.43, "val_frames": 30},
             {"last_miou": 0.50, "ema_miou": 0.49, "val_frames": 10},
             {"last_miou": 0.90, "val_frames": 10}, None]
    last, ema = ema_scores(folds)
    assert last == pytest.approx((0.40 * 30 + 0.50 * 10) / 40)
    assert ema == pytest.approx((0.43 * 30 + 0.49 * 10) / 40)
    assert ema_scores([{"last_miou": 0.4, "ema_miou": 0.5}, {"last_miou": 0.6, "ema_miou": 0.6}]) \
        == pytest.approx((0.5, 0.55))  # no frame counts: equal weights
    assert ema_scores([{"last_miou": 0.4, "ema_miou": None}]) == (None, None)

    ms = members()
    ms["unet_s0"].oof.update(ema_last=last, ema=ema)
    ledger = build_ledger(members=ms, models=MODELS)
    (row,) = rows_of(ledger, "EMA vs last")  # one member: no mean row
    assert row["subject"] == "unet_s0" and row["gain"] == pytest.approx(ema - last)
    assert row["baseline"] == pytest.approx(last)  # gain 0.02 = the band: within noise
    assert row["verdict"] == "within noise"
    (test,) = rows_of(ledger, "EMA vs last", "test")
    assert test["verdict"] == "not measured" and "validation folds only" in test["note"]
    (absent,) = rows_of(build_ledger(members=members(), models=MODELS), "EMA vs last")
    assert absent["verdict"] == "not measured" and "ema_miou" in absent["note"]
