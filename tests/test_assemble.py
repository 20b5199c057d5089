import numpy as np

from digit_demo.assemble import Detections, assemble, dedupe, drop_strays, main_group, reading_order


def dets(rows):
    """rows of (x1, y1, x2, y2, score, digit)"""
    a = np.array(rows, dtype=np.float32).reshape(-1, 6)
    return Detections(a[:, :4], a[:, 4], a[:, 5].astype(np.int64))


def test_orders_left_to_right_regardless_of_input_order():
    d = dets([(40, 10, 55, 40, 0.9, 9), (10, 10, 25, 40, 0.95, 4)])
    n = assemble(d, 0.5)
    assert n.text == "49" and n.label == 49
    assert n.confidence == np.float32(0.9) * np.float32(0.95)


def test_threshold_filters_low_scores():
    d = dets([(10, 10, 25, 40, 0.9, 1), (30, 10, 45, 40, 0.3, 2)])
    assert assemble(d, 0.5).text == "1"
    assert assemble(d, 0.2).text == "12"


def test_duplicate_boxes_of_different_digits_keep_the_best():
    d = dets([(10, 10, 25, 40, 0.9, 3), (11, 10, 26, 41, 0.7, 8), (30, 10, 45, 40, 0.8, 5)])
    assert len(dedupe(d)) == 2
    assert assemble(d, 0.5).text == "35"


def test_adjacent_digits_are_not_deduplicated():
    d = dets([(10, 10, 25, 40, 0.9, 1), (22, 10, 37, 40, 0.9, 1)])  # slight overlap, IoU ~0.1
    assert assemble(d, 0.5).text == "11"


def test_stray_small_box_is_dropped():
    d = dets([(10, 10, 25, 40, 0.9, 2), (30, 10, 45, 40, 0.9, 7), (50, 30, 53, 36, 0.6, 1)])
    assert len(drop_strays(d)) == 2
    assert assemble(d, 0.5).text == "27"
    assert assemble(d, 0.5, strays=False).text == "271"


def test_box_off_the_line_is_dropped():
    d = dets([(10, 10, 25, 40, 0.9, 2), (30, 10, 45, 40, 0.9, 7), (50, 80, 65, 110, 0.6, 4)])
    assert assemble(d, 0.5).text == "27"


def test_vertical_number_reads_top_to_bottom():
    d = dets([(10, 60, 30, 100, 0.9, 5), (11, 10, 31, 50, 0.9, 1), (10, 110, 30, 150, 0.8, 0)])
    assert assemble(d, 0.5).text == "150"


def test_multi_row_single_line_orders_by_x():
    d = dets([(50, 12, 65, 42, 0.9, 3), (10, 8, 25, 38, 0.9, 1), (30, 10, 45, 40, 0.9, 2)])
    assert [int(x) for x in reading_order(d).digits] == [1, 2, 3]


def test_empty_gives_minus_one():
    n = assemble(Detections(), 0.5)
    assert n.text == "" and n.label == -1 and n.confidence == 0.0
    d = dets([(10, 10, 25, 40, 0.2, 1)])
    assert assemble(d, 0.5).label == -1


def test_digit_beyond_a_wide_gap_is_another_number():
    # "74" with a neighbour's "1" two digit-heights to its left (seen in SVHN valid: read "174")
    d = dets([(10, 10, 25, 40, 0.85, 1), (85, 10, 100, 40, 0.95, 7), (102, 10, 117, 40, 0.9, 4)])
    assert assemble(d, 0.5).text == "74"
    assert assemble(d, 0.5, max_gap=None).text == "174"
    assert assemble(d, 0.5, max_gap=3.0).text == "174"


def test_main_group_is_the_one_with_more_evidence():
    d = reading_order(dets([(10, 10, 25, 40, 0.99, 3), (100, 10, 115, 40, 0.6, 5), (117, 10, 132, 40, 0.6, 6)]))
    assert [int(x) for x in main_group(d).digits] == [5, 6]  # 1.2 beats 0.99
    spaced = reading_order(dets([(10, 10, 25, 40, 0.9, 1), (35, 10, 50, 40, 0.9, 2), (60, 10, 75, 40, 0.9, 3)]))
    assert len(main_group(spaced)) == 3  # gaps of a third of the height stay one number


def test_vertical_number_splits_on_vertical_gaps():
    d = dets([(10, 10, 30, 50, 0.9, 1), (10, 55, 30, 95, 0.9, 2), (10, 200, 30, 240, 0.6, 9)])
    assert assemble(d, 0.5).text == "12"


def test_a_reused_detections_reads_each_threshold_as_a_fresh_one():
    rows = [(10, 10, 25, 40, 0.9, 1), (27, 10, 42, 40, 0.3, 2), (44, 10, 59, 40, 0.6, 7), (45, 11, 60, 41, 0.55, 1),
            (61, 10, 76, 40, 0.1, 4)]
    shared = dets(rows)
    thresholds = [0.05, 0.5, 0.2, 0.58, 0.95, 0.3, 0.1, 0.56]
    readings = [assemble(shared, t).text for t in thresholds + thresholds[::-1]]
    assert readings == [assemble(dets(rows), t).text for t in thresholds + thresholds[::-1]]
    assert readings[:5] == ["1274", "1", "127", "1", ""]  # without the 2, the 7 stands apart
