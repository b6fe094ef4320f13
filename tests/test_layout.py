"""The 0.2 layout: names that moved still work from their 0.1 homes (for one release), and the
bench extra holds what the library never imports."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import numpy as np
import pytest

from cryosphere.reconstruction import backprojection, experiments, fsc, symmetry

RECONSTRUCT_0_1 = {
    "Reconstruction": backprojection,
    "backproject": backprojection,
    "reconstruct": backprojection,
    "top_k_poses": backprojection,
    "symmetrize_map": symmetry,
    "symmetry_correlation": symmetry,
    "check_point_group": symmetry,
    "FSCCurve": fsc,
    "fourier_shell_correlation": fsc,
    "resolution_at_threshold": fsc,
    "HalfSetResult": experiments,
    "half_set_fsc": experiments,
    "ResolutionSweep": experiments,
    "resolution_vs_image_count": experiments,
}


def test_reconstruct_module_keeps_every_0_1_name():
    import cryosphere.reconstruct as flat_alias

    from cryosphere.reconstruction import reconstruct as old

    assert flat_alias is old
    for name, home in RECONSTRUCT_0_1.items():
        assert getattr(old, name) is getattr(home, name), name
    assert set(old.__all__) == set(RECONSTRUCT_0_1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the re-exports above warn about nothing
        old.fourier_shell_correlation  # noqa: B018


def test_reconstruct_plots_moved_to_figures_and_warn():
    from cryosphere.figures import resolution
    from cryosphere.reconstruction import reconstruct as old

    for name in ("plot_fsc_curves", "plot_resolution_vs_count"):
        with pytest.warns(DeprecationWarning, match=f"cryosphere.figures.resolution.{name}"):
            assert getattr(old, name) is getattr(resolution, name)
    with pytest.raises(AttributeError, match="no attribute 'plot_sweep'"):
        old.plot_sweep  # noqa: B018


def test_backproject_shows_the_options_of_reconstruct():
    shown = inspect.signature(backprojection.backproject).parameters
    full = inspect.signature(backprojection.reconstruct).parameters
    assert list(shown) == [p for p in full if p not in ("check_symmetry", "symmetry_threshold")]
    images = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(TypeError, match="pass check_symmetry to reconstruct"):
        backprojection.backproject(images, np.stack([np.eye(3)] * 2), check_symmetry=True)


def test_sweep_plot_moved_to_figures():
    from cryosphere.figures import plots
    from cryosphere.runs import sweep

    assert sweep.plot_sweep is plots.plot_sweep
    assert "plot_sweep" in sweep.__all__


SPHERES_0_1 = (
    "IN_PLANE_COLORSCALE SphereView DistributionSet in_plane_angles_deg grid_in_plane_angles_deg "
    "in_plane_colors in_plane_colormap lon_lat_deg pose_markers lat_lon_pixel_mesh "
    "check_distribution sphere_view plot_viewing_sphere plot_pose_scatter "
    "plot_label_vs_prediction plot_mollweide save_figure export_html png_export_problem "
    "export_png plotly_mimebundle"
).split()


def test_spheres_module_keeps_every_name():
    from cryosphere.figures import export, mollweide, so3_plotly, so3_views, spheres

    homes = (so3_views, so3_plotly, mollweide, export)
    assert set(SPHERES_0_1) <= set(spheres.__all__)
    for name in spheres.__all__:
        owners = [home for home in homes if name in home.__all__]
        assert len(owners) == 1, f"{name} lives in {owners}"
        assert getattr(spheres, name) is getattr(owners[0], name)


def test_bench_extra_holds_what_only_benchmarks_and_tests_import():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    bench = ["torch-fourier-slice>=0.6", "torch-ctf>=0.6"]
    assert project["optional-dependencies"]["bench"] == bench
    for peer in ("torch-fourier-slice", "torch-ctf"):
        assert not any(r.startswith(peer) for r in project["dependencies"])
    assert any("bench" in r for r in project["optional-dependencies"]["test"])
    for module in ("torch_fourier_slice", "import torch_ctf"):
        library = [p for p in (root / "cryosphere").rglob("*.py") if module in p.read_text()]
        assert library == [], module
    assert "torch_fourier_slice" in (root / "benchmarks" / "bench_reconstruction.py").read_text()


SPLIT_0_2 = {
    "cryosphere.geometry.so3": ("rotations", "grids", "point_groups"),
    "cryosphere.imaging.structure": ("atoms", "chain_symmetry"),
    "cryosphere.imaging.simulate": ("datasets",),
    "cryosphere.poses.labels": ("templates", "landscape", "soft_maps", "label_explorer"),
    "cryosphere.poses.model": ("harmonics", "layers"),
    "cryosphere.poses.train": ("training_setup", "checkpoints", "predictions"),
    "cryosphere.poses.evaluate": ("equivariance",),
}


@pytest.mark.parametrize("old", sorted(SPLIT_0_2))
def test_split_modules_keep_their_names(old):
    """A module split into smaller ones still serves every name it had, as the very object of
    its new home, and lists it in ``__all__``."""
    import importlib

    module = importlib.import_module(old)
    package = old.rsplit(".", 1)[0]
    moved = set()
    for part in SPLIT_0_2[old]:
        home = importlib.import_module(f"{package}.{part}")
        for name in home.__all__:
            if name in module.__all__:
                assert getattr(module, name) is getattr(home, name), f"{old}.{name}"
                moved.add(name)
    assert moved, f"{old} re-exports nothing from {SPLIT_0_2[old]}"
    for name in module.__all__:
        assert hasattr(module, name), f"{old}.__all__ names {name} but the module lacks it"


OLD_NAMES_0_1 = {
    "cryosphere.geometry.so3": "random_rotations matrices_from_relion_euler healpix_so3_grid "
    "nearest_grid_indices point_group symmetry_mates as_symmetry_ops MAX_HEALPIX_LEVEL",
    "cryosphere.imaging.structure": "load_structure coulomb_potential_map detect_point_group "
    "resolve_point_group check_imageable MAX_ATOMS EMBEDDED_STRUCTURES",
    "cryosphere.imaging.simulate": "SimulationParameters ParticleDataset simulate_dataset "
    "load_or_simulate SIMULATION_FILES",
    "cryosphere.poses.labels": "PoseLabels template_bank mse_landscape template_matching "
    "soft_labels top_fraction_mask tune_lambda compute_labels load_or_make_labels "
    "label_explorer_data LabelExplorerData DEFAULT_MEMORY_LIMIT_BYTES",
    "cryosphere.poses.model": "ModelConfig PoseDistributionNetwork QuarterTurnConv2d "
    "grid_wigner wigner_d_flat rotate_so3_coefficients build_model",
    "cryosphere.poses.train": "TrainingConfig TrainingResult Predictions train_model predict "
    "load_model load_checkpoint checkpoint_path load_or_train pose_errors_deg LOSSES",
    "cryosphere.poses.evaluate": "pose_metrics compare_pose_estimators equivariance_table "
    "EquivarianceResult ROTATION_KINDS UNIFORM_LOG_LIKELIHOOD",
}


@pytest.mark.parametrize("old", sorted(OLD_NAMES_0_1))
def test_names_users_call_still_import_from_the_old_modules(old):
    import importlib

    module = importlib.import_module(old)
    for name in OLD_NAMES_0_1[old].split():
        assert name in module.__all__ and hasattr(module, name), f"{old}.{name}"


def test_no_library_module_is_over_500_lines():
    """The size the layout promises (README, Library layout): one concept per module."""
    root = Path(__file__).resolve().parents[1] / "cryosphere"
    sizes = {p.relative_to(root): len(p.read_text().splitlines()) for p in root.rglob("*.py")}
    assert len(sizes) > 50
    assert {path: n for path, n in sizes.items() if n > 500} == {}
