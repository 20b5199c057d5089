import numpy as np
import pytest

from digit_demo.types import Detections
from digit_demo.ensemble import calibrate, fuse, nms_fusion, vote_fusion, weighted_box_fusion


def dets(rows):
    a = np.array(rows, dtype=np.float32).reshape(-1, 6)
    return Detections(a[:, :4], a[:, 4], a[:, 5].astype(np.int64))


A = dets([(10, 10, 30, 50, 0.9, 4), (40, 10, 60, 50, 0.8, 9)])
B = dets([(12, 10, 32, 50, 0.7, 4), (40, 12, 60, 52, 0.6, 9), (80, 10, 100, 50, 0.5, 1)])


def test_nms_groups_by_digit_not_by_model():
    out = nms_fusion([A, B])
    assert sorted(out.digits.tolist()) == [1, 4, 9]
    assert out.scores[out.digits == 4][0] == pytest.approx(0.9)
    # same spot, different digit: both survive class-aware NMS (assembly's dedupe handles them)
    c = dets([(10, 10, 30, 50, 0.6, 7)])
    assert sorted(nms_fusion([A, c]).digits.tolist()) == [4, 7, 9]


def test_wbf_averages_boxes_weighted_by_score_and_penalises_lone_boxes():
    out = weighted_box_fusion([A, B])
    four = out.boxes[out.digits == 4][0]
    assert four[0] == pytest.approx((10 * 0.9 + 12 * 0.7) / 1.6, abs=1e-4)
    assert out.scores[out.digits == 4][0] == pytest.approx((0.9 + 0.7) / 2)
    assert out.scores[out.digits == 1][0] == pytest.approx(0.5 / 2)  # found by one model of two
    assert list(out.scores) == sorted(out.scores, reverse=True)


def test_fuse_by_name_and_empty_inputs():
    assert len(fuse([Detections(), Detections()], "nms")) == 0
    assert len(fuse([Detections(), Detections()], "wbf")) == 0
    assert len(fuse([A], "wbf")) == 2
    assert len(fuse([Detections(), Detections()], "vote")) == 0
    assert len(fuse([A], "vote")) == 2
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse([A], "soft-nms")


def test_weights_follow_measured_accuracy():
    from digit_demo.ensemble import member_weights

    metas = [{"metrics": {"valid": {"accuracy": 0.8}}}, {"metrics": {"valid": {"accuracy": 0.4}}}]
    assert member_weights(metas) == pytest.approx([0.64, 0.16])
    assert member_weights([{}, metas[0]]) == [1.0, 1.0]
    # the weaker model's lone box loses more of its score than the stronger one's
    strong = dets([(10, 10, 30, 50, 0.8, 4)])
    weak = dets([(60, 10, 80, 50, 0.8, 7)])
    out = weighted_box_fusion([strong, weak], weights=[0.64, 0.16])
    assert out.scores[out.digits == 4][0] == pytest.approx(0.4) and out.scores[out.digits == 7][0] == pytest.approx(0.1)


def test_members_are_read_at_their_own_best_threshold_for_how_they_run():
    from digit_demo.ensemble import member_threshold
    from digit_demo.pipeline import Pipeline, PipelineConfig

    meta = {"threshold": 0.5, "metrics": {"valid_multi_scale": {"threshold": 0.35}}}
    assert member_threshold(meta) == 0.5 and member_threshold(meta, multi_scale=True) == 0.35
    assert member_threshold({"threshold": 0.4}, multi_scale=True) == 0.4 and member_threshold({}) is None
    import json

    from digit_demo.checkpoints import CHECKPOINT_DIR

    shipped = json.loads((CHECKPOINT_DIR / "resnet34_fpn.json").read_text())  # the sidecar as written
    own = {False: shipped["threshold"], True: shipped["metrics"]["valid_multi_scale"]["threshold"]}
    assert own[False] != own[True]  # else the test could not tell one from the other
    for multi_scale in (False, True):
        ens = Pipeline(PipelineConfig(("resnet18_fpn", "resnet34_fpn"), digit_reader=None, multi_scale=multi_scale))
        assert ens.member_thresholds[1] == own[multi_scale]


def test_calibration_maps_each_models_best_threshold_to_one_half():
    s = np.array([0.1, 0.25, 0.6, 1.0])
    c = calibrate(s, 0.25)
    assert c[1] == pytest.approx(0.5) and c[3] == pytest.approx(1.0)
    assert np.all(np.diff(c) > 0)  # monotone: one model's ranking never changes
    assert calibrate(s, None) is s and calibrate(s, 1.0) is s


def test_vote_settles_a_disputed_digit_by_weighted_majority():
    # two models read a 4 on the left, the third a 7 on the same spot; all agree on the 9
    a = dets([(10, 10, 30, 50, 0.9, 4), (40, 10, 60, 50, 0.8, 9)])
    b = dets([(11, 10, 31, 50, 0.7, 4), (40, 11, 60, 51, 0.8, 9)])
    c = dets([(10, 11, 30, 51, 0.95, 7), (41, 10, 61, 50, 0.9, 9)])
    out = vote_fusion([a, b, c])
    assert sorted(out.digits.tolist()) == [4, 9]  # one box per spot: the 7 lost the vote
    assert out.scores[out.digits == 4][0] == pytest.approx((0.9 + 0.7) / 3)
    assert out.scores[out.digits == 9][0] == pytest.approx((0.8 + 0.8 + 0.9) / 3)
    left = out.boxes[out.digits == 4][0]
    assert left[0] == pytest.approx((10 * 0.9 + 11 * 0.7) / 1.6, abs=1e-4)  # only the winners' boxes
    # weigh the third model heavily enough and its 7 wins instead
    assert 7 in vote_fusion([a, b, c], weights=[1, 1, 5]).digits.tolist()
    # per-digit NMS would have kept both readings of the left digit
    assert sorted(nms_fusion([a, b, c]).digits.tolist()) == [4, 7, 9]


def test_vote_calibrates_members_to_their_own_thresholds():
    timid = dets([(10, 10, 30, 50, 0.3, 4)])  # best threshold 0.25: 0.3 is a confident box for it
    bold = dets([(60, 10, 80, 50, 0.6, 2)])  # best threshold 0.6: 0.6 is borderline
    out = vote_fusion([timid, bold], thresholds=[0.25, 0.6])
    assert out.scores[out.digits == 4][0] > out.scores[out.digits == 2][0]
    raw = vote_fusion([timid, bold])
    assert raw.scores[raw.digits == 4][0] < raw.scores[raw.digits == 2][0]
