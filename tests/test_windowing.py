import numpy as np
import pytest

from dicom_preprocess.windowing import PRESET_WINDOWS, Window, apply_window, parse_windows, to_uint8


def test_linear_window_matches_the_formula():
    hu = np.array([-1000.0, 0.0, 40.0, 79.9, 80.0, 2000.0])
    brain = PRESET_WINDOWS["brain"]
    expected = np.clip((hu - (40 - 40)) / 80, 0, 1)
    np.testing.assert_allclose(apply_window(hu, brain), expected)
    assert to_uint8(apply_window(np.array([40.0]), brain))[0] == 128  # round(127.5) -> 128 (half to even gives 128)


def test_sigmoid_window_hits_eps_at_the_edges():
    window = Window("brain", 40, 80)
    values = apply_window(np.array([0.0, 40.0, 80.0]), window, "sigmoid")
    np.testing.assert_allclose(values, [1 / 255, 0.5, 1 - 1 / 255], rtol=1e-9)


def test_parse_windows_presets_and_custom():
    windows = parse_windows("brain,subdural,bone")
    assert [w.name for w in windows] == ["brain", "subdural", "bone"]
    assert (windows[1].center, windows[1].width) == (80, 200)
    assert parse_windows("blood:60/40")[0] == Window("blood", 60, 40)
    with pytest.raises(ValueError, match="unknown preset"):
        parse_windows("brian")
    with pytest.raises(ValueError, match="width must be > 0"):
        parse_windows("x:1/0")
