from __future__ import annotations

import numpy as np
import pytest

from cryosphere import io


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "record.json"
    io.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert io.read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_map_round_trip_and_voxel_size(tmp_path):
    volume = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    io.write_map(tmp_path / "m.mrc", volume, 1.25)
    back, voxel = io.read_map(tmp_path / "m.mrc")
    np.testing.assert_array_equal(back, volume)
    assert voxel == pytest.approx(1.25)


def test_non_cubic_and_nan_maps_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cubic"):
        io.write_map(tmp_path / "m.mrc", np.zeros((4, 4, 5), np.float32), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        io.write_map(tmp_path / "m.mrc", np.full((4, 4, 4), np.nan, np.float32), 1.0)
    assert not (tmp_path / "m.mrc").exists()
    import mrcfile

    with mrcfile.new(tmp_path / "box.mrc") as mrc:
        mrc.set_data(np.zeros((4, 4, 6), np.float32))
    with pytest.raises(ValueError, match="cubic"):
        io.read_map(tmp_path / "box.mrc")
    with pytest.raises(FileNotFoundError, match="check the path"):
        io.read_map(tmp_path / "missing.mrc")


def test_star_round_trip_with_extra_column(tmp_path):
    angles = np.array([[10.0, 20.0, 30.0], [-170.0, 90.0, 5.5]])
    io.write_particles_star(
        tmp_path / "p.star",
        angles,
        stack_name="s.mrcs",
        pixel_size=1.5,
        image_size=64,
        extra_columns={"MaxValueProbDistribution": np.array([0.5, 0.25])},
    )
    star = io.read_particles_star(tmp_path / "p.star")
    np.testing.assert_allclose(star["angles_deg"], angles, atol=1e-6)
    assert star["pixel_size"] == 1.5 and star["image_size"] == 64
    assert star["image_names"] == ["000001@s.mrcs", "000002@s.mrcs"]
    np.testing.assert_allclose(star["particles"]["rlnMaxValueProbDistribution"], [0.5, 0.25])


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os

    from cryosphere import io

    mask = os.umask(0o022)
    try:
        path = io.write_json(tmp_path / "record.json", {"a": 1})
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644
