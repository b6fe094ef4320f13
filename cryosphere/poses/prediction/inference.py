"""Predict poses for a user's particle set: RELION STAR in, STAR with predicted angles out.

:func:`predict_star` (the ``cryosphere predict`` command) reads a RELION 3.0 or 3.1+ particle
STAR file and its stacks in batches (:mod:`cryosphere.imaging.particles`), brings every batch
to the network's box (:func:`cryosphere.imaging.preprocess.prepare_images`: optional crop,
Fourier crop, CTF phase flip when the set has defocus values, background normalisation), runs
the network (softmax on its top ``k`` cells; without a map averaged over
:data:`NETWORK_ALONE_TURNS` quarter turns by default), and writes

* ``OUTPUT.star``: every input table and column unchanged (image names included: relative
  stack paths resolve from the project folder, as RELION's: keep the output inside it), with
  ``rlnAngleRot/Tilt/Psi`` the most probable grid pose (RELION ZYZ, degrees), its probability
  ``rlnMaxValueProbDistribution``, and ``rlnCryoSphereAngularSpread`` the weighted RMS angle
  (deg, not symmetry-aware) from the best cell to the ``top_k`` cells, ``√(Σp_j d_j² / Σp_j)``;
* ``OUTPUT_topk.npz``: ``top_index`` ``(n, k)`` grid cells, ``top_probability`` ``(n, k)``,
  ``top_angles_deg`` ``(n, k, 3)`` RELION angles, ``image_name`` ``(n,)``, ``grid_level``.

With a consensus map (``refine``, :class:`cryosphere.poses.search.map_search.MapRefinement`;
``cryosphere predict --map``) each particle's top cells (or their children on a finer grid)
are scored against the map's projections carrying the particle's CTF, with an optional
translation search (:class:`~cryosphere.poses.search.map_search.MapSearch`), and the best one is
written: ``rlnAngleRot/Tilt/Psi`` from the search (its most probable candidate),
``rlnMaxValueProbDistribution`` the search posterior's probability of that pose (RELION's
meaning; :mod:`cryosphere.poses.search.posterior`: noise whitened per shell from the
particles' backgrounds, shifts summed), :data:`NETWORK_PROBABILITY_COLUMN` the network's
probability of the cell that holds it, and, with a translation search, the particle's origin:
the input origin plus the shift found, in the input's own convention (``rlnOriginX/Y`` in px
for RELION 3.0 files, ``rlnOriginXAngst/YAngst`` in Å for 3.1+). The side file then also holds
``refined_index`` ``(n,)``, ``refine_level`` and ``shift_px`` ``(n, 2)``, and the search's
:data:`SEARCHED_KEPT` most probable candidates by their posterior
(:func:`~cryosphere.poses.search.local_search.candidate_posterior`): ``searched_index`` ``(n, r)``
(cells of the search level), ``searched_probability`` ``(n, r)`` and ``searched_shift_px``
``(n, r, 2)`` for a weighted reconstruction (:meth:`TopK.searched_weights`); both shifts are
whole origins, the STAR file's in px of the search's box (``+shift`` centres the particle).

Every particle is first recentred by its input origin (``+origin / pixel_size``, RELION's
sign, as ``cryosphere train`` does): the network sees centred particles and the translation
search looks around the refined origin. Numbers have 9 significant digits (float32 round trip).

Everything is checked before the first batch (STAR, stacks, checkpoint, box sizes, an existing
output unless ``overwrite``); both files are written atomically at the end: a failure writes
nothing. An image with NaN or infinite pixels stops the run naming it, before anything is
written; ``skip_bad`` leaves such particles out (:attr:`PredictionSummary.skipped`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import starfile
import torch
from tqdm.auto import tqdm

from cryosphere import io
from cryosphere.geometry import grids
from cryosphere.geometry import rotations as geometry_rotations
from cryosphere.imaging import preprocess
from cryosphere.imaging.formats import relion_star
from cryosphere.imaging.loader import checked_and_centred
from cryosphere.imaging.particles import ParticleSet, StackReader, read_particle_set
from cryosphere.imaging.projection import resolve_device
from cryosphere.poses.network import checkpoints
from cryosphere.poses.prediction import predictions as pose_predictions
from cryosphere.poses.search import contrast as contrast_module
from cryosphere.poses.search import map_search

__all__ = [
    "PredictionSummary",
    "TopK",
    "angular_spread_deg",
    "topk_path",
    "load_topk",
    "predict_star",
]

SPREAD_COLUMN = "rlnCryoSphereAngularSpread"
#: With ``--map``: the network's probability of the cell holding the written pose.
NETWORK_PROBABILITY_COLUMN = "rlnCryoSphereNetworkProbability"
#: Candidates of the map search kept per particle in the side file (most probable first).
SEARCHED_KEPT = 10
#: How numbers are written to STAR files: enough significant digits for a float32 round trip.
STAR_FLOAT_FORMAT = "%.9g"
#: Quarter turns averaged when the network's own pose is written (no map search, grid level
#: >= 1): sharper than one pass on every set measured (docs/training_on_a_refinement.md).
NETWORK_ALONE_TURNS = 4

#: Images per network pass on the CPU (other devices: the whole batch): 64 images' activations
#: stay in the cache; one thread, default network, 64 px: 0.30 against 0.45 ms/image at 256.
CPU_NETWORK_CHUNK = 64


@dataclass(frozen=True)
class PredictionSummary:
    """What :func:`predict_star` did: output paths, image count, seconds, images per second,
    and the image names of the particles left out (``skip_bad``: NaN or infinite pixels)."""

    star: Path
    topk: Path
    n_images: int
    seconds: float
    skipped: tuple[str, ...] = ()

    @property
    def images_per_s(self) -> float:
        """Throughput over the whole call (reading, preprocessing, network)."""
        return self.n_images / self.seconds if self.seconds > 0 else float("inf")


def topk_path(output_star: str | os.PathLike[str]) -> Path:
    """``predicted.star`` -> ``predicted_topk.npz`` beside it."""
    path = Path(output_star)
    return path.with_name(f"{path.stem}_topk.npz")


def angular_spread_deg(
    grid: np.ndarray, top_index: np.ndarray, top_probability: np.ndarray
) -> np.ndarray:
    """Probability-weighted RMS geodesic angle (deg) from the best cell (column 0) to the
    ``k`` cells of ``top_index`` ``(n, k)`` with probabilities ``(n, k)``: ``(n,)``."""
    best = grid[top_index[:, :1]]
    distance = geometry_rotations.geodesic_distance_deg(best, grid[top_index])
    weights = top_probability / np.maximum(top_probability.sum(axis=1, keepdims=True), 1e-30)
    return np.sqrt((weights * distance**2).sum(axis=1))


def _check_request(
    pset: ParticleSet,
    model,
    output: Path,
    crop_size: int | None,
    ctf_correction: str,
    overwrite: bool = False,
) -> str:
    if output.resolve() == pset.star_path.resolve():
        raise FileExistsError(f"the output {output} is the input STAR file; choose another name")
    if output.suffix != ".star":
        raise ValueError(f"the output must be a .star file, got {output}")
    if not overwrite and (output.exists() or topk_path(output).exists()):
        raise FileExistsError(
            f"{output} already exists; choose another name or pass --overwrite (overwrite=True)"
        )
    target = int(model.config.image_size)
    box = pset.image_size if crop_size is None else int(crop_size)
    if crop_size is not None and not target <= box <= pset.image_size:
        raise ValueError(f"crop size must lie in {target}..{pset.image_size} px, got {crop_size}")
    if box < target:
        raise ValueError(
            f"the particles are {box} px but the model takes {target} px images; it cannot "
            "upsample: train a model for a smaller box"
        )
    if box != target and box % 2:
        raise ValueError(
            f"a {box}-px box cannot be Fourier-cropped to {target} px; crop it to even"
        )
    options = ("auto", *preprocess.CTF_CORRECTIONS)
    if ctf_correction not in options:
        raise ValueError(f"ctf_correction must be one of {options}, got {ctf_correction!r}")
    if ctf_correction == "auto":
        return "phase_flip" if pset.ctf is not None else "none"
    if ctf_correction != "none" and pset.ctf is None:
        raise ValueError(f"ctf_correction={ctf_correction!r} but {pset.star_path} has no defocus")
    return ctf_correction


def _write_outputs(pset: ParticleSet, output: Path, arrays: dict[str, np.ndarray], level: int):
    table = pset.particles.copy()
    angles = geometry_rotations.relion_euler_from_matrices(arrays["best_rotation"]).reshape(-1, 3)
    for column, values in zip(
        ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"), angles.T, strict=True
    ):
        table[column] = values
    table["rlnMaxValueProbDistribution"] = arrays["best_probability"]
    table[SPREAD_COLUMN] = arrays["spread_deg"]
    if "network_probability" in arrays:
        table[NETWORK_PROBABILITY_COLUMN] = arrays["network_probability"]
    extra = {}
    if "refined_index" in arrays:
        searched = ("searched_index", "searched_probability", "searched_shift_px")
        extra = {k: arrays[k] for k in ("refined_index", "shift_px", *searched)}
        extra["refine_level"] = np.int64(arrays["refine_level"])
        if arrays["origin_angstrom"] is not None:
            relion_star.write_origins(
                table, arrays["origin_angstrom"], pset.origin_convention, pset.particle_pixels()
            )
    keep = ~arrays["bad"]
    if not keep.all():  # skip_bad: the damaged particles are left out of both files
        table = table[keep].reset_index(drop=True)
        extra = {k: v if np.ndim(v) == 0 else v[keep] for k, v in extra.items()}
    top_angles = geometry_rotations.relion_euler_from_matrices(
        grids.healpix_so3_grid(level)[arrays["top_index"].reshape(-1)]
    ).reshape(*arrays["top_index"].shape, 3)
    io.write_npz(
        topk_path(output),
        top_index=arrays["top_index"][keep],
        top_probability=arrays["top_probability"][keep],
        top_angles_deg=top_angles[keep],
        image_name=np.asarray(pset.particles["rlnImageName"], dtype=str)[keep],
        grid_level=np.int64(level),
        **extra,
    )
    tables = dict(pset.tables)
    tables[pset.particles_key] = table
    with io.atomic_path(output) as tmp:
        if pset.particles_key == "" and len(tables) == 1:
            starfile.write(table, tmp, float_format=STAR_FLOAT_FORMAT)
        else:
            starfile.write(tables, tmp, float_format=STAR_FLOAT_FORMAT)


def _top_cells(
    model, images: torch.Tensor, k: int, bf16: bool = False, turns: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable grid cells of each image ``(n, N, N)`` (model box): their
    probabilities ``(n, k)`` float32 and indices ``(n, k)`` int64, most probable first (call
    under ``torch.inference_mode``). ``bf16``: the network under bfloat16 autocast, softmax and
    top ``k`` in float32. ``turns`` > 1: averaged over quarter turns (``predictions``). On the
    CPU the network sees :data:`CPU_NETWORK_CHUNK` images at a time."""
    model.eval()
    chunk = CPU_NETWORK_CHUNK if images.device.type == "cpu" else max(1, images.shape[0])
    parts = []
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bool(bf16)):
        for start in range(0, images.shape[0], chunk):
            part = images[start : start + chunk]
            if turns > 1:  # normalised log-probabilities: their logsumexp below is 0
                parts.append(pose_predictions.turn_averaged_log_probabilities(model, part, turns))
            else:
                parts.append(model.logits_from_coefficients(model.coefficients(part)))
    logits = torch.cat(parts).float()
    values, indices = pose_predictions.top_k_by_groups(logits, k)
    probability = torch.exp(values - torch.logsumexp(logits, dim=1, keepdim=True))
    return probability.cpu().numpy(), indices.cpu().numpy()


def _refined_outputs(
    arrays: dict, search: map_search.MapSearch, pixel: float, input_origins: np.ndarray
) -> None:
    """Best pose, its search and network probabilities and origins (input origin + shift
    found: the side file's in px of ``pixel`` Å, the STAR file's in Å) from the search's rows."""
    arrays["best_rotation"] = grids.healpix_so3_grid(search.level)[arrays["refined_index"]]
    parent = search.parent_cells(arrays["refined_index"])
    hit = arrays["top_index"] == parent[:, None]
    arrays["network_probability"] = np.where(hit, arrays["top_probability"], 0.0).max(axis=1)
    arrays["best_probability"] = arrays["searched_probability"][:, 0].astype(np.float64)
    arrays["refine_level"] = search.level
    stated = np.asarray(input_origins, dtype=np.float64) / pixel
    arrays["shift_px"] = arrays["shift_px"] + stated
    arrays["searched_shift_px"] = arrays["searched_shift_px"] + stated[:, None]
    shifted = search.refinement.max_shift_px > 0
    arrays["origin_angstrom"] = arrays["shift_px"] * pixel if shifted else None


def _contrast(pset, requested, checkpoint, search, image_size, crop_size):
    """The contrast of ``--contrast`` (:mod:`cryosphere.poses.search.contrast`), printed;
    with a map search, decided against the map it prepared (no second read)."""
    if search is None:
        decided = contrast_module.resolve_without_map(requested, checkpoint)
    else:
        decided = contrast_module.decide_for_particle_set(
            pset, requested, search.volume, image_size, crop_size=crop_size,
            max_shift_px=max(2.0, search.refinement.max_shift_px),
        )  # fmt: skip
    contrast_module.report(decided)
    return decided


def predict_star(
    star_path: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    top_k: int = 10,
    ctf_correction: str = "auto",
    crop_size: int | None = None,
    normalise: bool = True,
    progress: bool = True,
    bf16: bool = False,
    refine: map_search.MapRefinement | map_search.MapSearch | None = None,
    turns: int | None = None,
    shard=None,
    contrast: str = "auto",
    project_dir: str | os.PathLike[str] | None = None,
    pixel_size_angstrom: float | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
) -> PredictionSummary:
    """Predict a pose for every particle of ``star_path`` (see module docstring).

    Args:
        checkpoint: a CryoSphere checkpoint (:func:`cryosphere.poses.network.checkpoints.load_model`).
        output: the STAR file to write; ``OUTPUT_topk.npz`` goes beside it.
        device: ``"cpu"``, ``"cuda"``; default CUDA when available.
        top_k: cells kept per particle in the side file and the spread.
        ctf_correction: ``"auto"`` (phase flip when the set has defocus values), or one of
            ``"phase_flip"``, ``"wiener"``, ``"none"``.
        crop_size: real-space crop (px) before downsampling to the model's box.
        normalise: background normalisation of each image (mean 0, std 1 outside a circle).
        bf16: run the network under bfloat16 autocast (GPU; the softmax stays float32).
        turns: average the network's distribution over 1, 2 or 4 quarter turns of each image
            (``turns`` passes; sharper at low SNR); None: :data:`NETWORK_ALONE_TURNS` without
            ``refine`` (grid level >= 1), else 1 (the map decides; one pass is faster).
        refine: search the top cells against a consensus map (module docstring); a
            :class:`~cryosphere.poses.search.map_search.MapSearch` already prepared for these
            particles is used as it is (the map projected once for many calls); None: the
            network's most probable cell.
        contrast: ``"auto"``, ``"white"`` or ``"dark"`` (:mod:`cryosphere.poses.search.contrast`;
            dark particles are negated on reading); the decision is printed and written as
            the output STAR file's first comment line.
        shard: this rank's share of a distributed run
            (:class:`cryosphere.poses.prediction.sharded_prediction.ShardPlan`: ``count``, ``batches``,
            ``finish``); None: every particle, read here. Use
            :func:`cryosphere.poses.prediction.sharded_prediction.predict_star_distributed`.
        project_dir: the project folder the stacks are named from (RELION's; None: found as
            RELION does, :mod:`cryosphere.imaging.formats.relion_star`), or a cryoSPARC ``.cs``'s.
        pixel_size_angstrom: Å per pixel when the STAR file states none.
        skip_bad: leave particles with NaN or infinite pixels out of the output (listed in
            the summary) instead of refusing the set.
        overwrite: replace an existing output (default: FileExistsError).
    """
    started = time.perf_counter()
    output = Path(output)
    pset = read_particle_set(
        star_path, project_dir=project_dir, pixel_size_angstrom=pixel_size_angstrom
    )
    device = resolve_device(device)
    model = checkpoints.load_model(checkpoint, device=device)
    correction = _check_request(pset, model, output, crop_size, ctf_correction, overwrite)
    level = int(model.config.grid_level)
    if turns is None:
        turns = NETWORK_ALONE_TURNS if refine is None and level >= 1 else 1
    turns = pose_predictions.check_turns(turns)  # before the first batch
    grid = grids.healpix_so3_grid(level)
    k = max(1, min(int(top_k), grid.shape[0]))
    n = len(pset)
    arrays = {
        "top_index": np.empty((n, k), np.int64),
        "top_probability": np.empty((n, k), np.float32),
        "bad": np.zeros(n, bool),
    }
    search = None
    if refine is not None:  # the search's box: the refinement's, else the network's
        plan = getattr(refine, "refinement", refine)  # a MapSearch's, or the MapRefinement
        search_box = plan.search_box(model.config.image_size, crop_size or pset.image_size)
    if isinstance(refine, map_search.MapSearch):
        search = refine
        search.check_fits(pset, search_box, level, crop_size)
    elif refine is not None:
        search = map_search.MapSearch(refine, pset, search_box, level, progress, crop_size)
    if search is not None:
        arrays["refined_index"], arrays["shift_px"] = np.zeros(n, np.int64), np.zeros((n, 2))
        kept = min(SEARCHED_KEPT, search.candidate_count(k))
        arrays["searched_index"] = np.zeros((n, kept), np.int64)
        arrays["searched_probability"] = np.zeros((n, kept), np.float32)
        arrays["searched_shift_px"] = np.zeros((n, kept, 2), np.float64)
    box = search_box if search is not None else model.config.image_size
    decided = _contrast(pset, contrast, checkpoint, search, box, crop_size)
    total = n if shard is None else shard.count
    bar = tqdm(total=total, desc="predicting", disable=not progress, unit="img")
    with StackReader(pset) as reader, torch.inference_mode():
        batches = reader.batches(batch_size) if shard is None else shard.batches(pset, batch_size)
        for indices, images in batches:
            images = checked_and_centred(pset, indices, images, skip_bad, arrays["bad"])
            images = images if decided.sign > 0 else -images  # dark protein: negated first
            ctf = pset.ctf.subset(indices) if pset.ctf is not None else None
            prepared, _ = preprocess.prepare_images(
                images.to(device),
                pset.pixel_size_angstrom,
                target_size=model.config.image_size,
                crop_size=crop_size,
                ctf=ctf,
                ctf_correction=correction,
                normalise=normalise,
            )
            top_p, top_i = _top_cells(model, prepared, k, bf16, turns)
            if search is not None:  # the raw images at the search's box, not CTF-corrected
                raw, search_pixel = preprocess.prepare_images(
                    images,
                    pset.pixel_size_angstrom,
                    target_size=search_box,
                    crop_size=crop_size,
                    normalise=normalise,
                )
                found = search(raw, ctf, search_pixel, top_i)
                arrays["refined_index"][indices] = found.match.best_index
                arrays["shift_px"][indices] = found.match.shift_px
                best = found.most_probable(arrays["searched_index"].shape[1])
                arrays["searched_index"][indices] = best[0]
                arrays["searched_probability"][indices] = best[1]
                arrays["searched_shift_px"][indices] = best[2]
            arrays["top_index"][indices] = top_i
            arrays["top_probability"][indices] = top_p
            bar.update(len(indices))
    bar.close()
    if shard is not None and (arrays := shard.finish(arrays)) is None:
        return PredictionSummary(output, topk_path(output), total, time.perf_counter() - started)
    arrays["best_rotation"] = grid[arrays["top_index"][:, 0]]
    arrays["best_probability"] = arrays["top_probability"][:, 0].copy()
    if search is not None:
        search_pixel = pset.pixel_size_angstrom * (crop_size or pset.image_size) / search_box
        _refined_outputs(arrays, search, search_pixel, pset.origins_angstrom)
    arrays["spread_deg"] = angular_spread_deg(grid, arrays["top_index"], arrays["top_probability"])
    _write_outputs(pset, output, arrays, level)
    contrast_module.annotate_star(output, decided)
    return PredictionSummary(
        star=output,
        topk=topk_path(output),
        n_images=n - int(arrays["bad"].sum()),
        seconds=time.perf_counter() - started,
        skipped=tuple(pset.image_names(np.flatnonzero(arrays["bad"]))),
    )


@dataclass(frozen=True)
class TopK:
    """The side file of :func:`predict_star` (``OUTPUT_topk.npz``), read back.

    Attributes:
        index: ``(n, k)`` int64 grid cells, most probable first.
        probability: ``(n, k)`` float32 their probabilities (of the full softmax).
        image_name: ``(n,)`` rlnImageName of each particle (STAR order).
        level: grid level of the cells.
        searched_index, searched_probability, searched_shift_px, searched_level: with a map
            search (``predict --map``), its most probable candidates ``(n, r)`` (cells of
            ``searched_level``), their posterior ``(n, r)`` and origins ``(n, r, 2)``, px of
            the search's box (input origin + shift found; ``+origin`` centres); else None.
    """

    index: np.ndarray
    probability: np.ndarray
    image_name: np.ndarray
    level: int
    searched_index: np.ndarray | None = None
    searched_probability: np.ndarray | None = None
    searched_shift_px: np.ndarray | None = None
    searched_level: int | None = None

    def searched_rotations(self) -> np.ndarray:
        """``(n, r, 3, 3)`` poses of the map search's most probable candidates (``predict
        --map``; ValueError without)."""
        self._need_search()
        return grids.healpix_so3_grid(self.searched_level)[self.searched_index]

    def searched_weights(self) -> np.ndarray:
        """``(n, r)`` float64 the search's posterior renormalised over the kept candidates
        (a probability-weighted reconstruction from the searched poses)."""
        self._need_search()
        p = self.searched_probability.astype(np.float64)
        return p / np.maximum(p.sum(axis=1, keepdims=True), 1e-300)

    def _need_search(self) -> None:
        if self.searched_index is None:
            raise ValueError("this side file holds no map search; run cryosphere predict --map")

    def rotations(self) -> np.ndarray:
        """``(n, k, 3, 3)`` poses of the cells."""
        return grids.healpix_so3_grid(self.level)[self.index]

    def weights(self) -> np.ndarray:
        """``(n, k)`` float64 probabilities renormalised over the ``k`` cells (for a
        probability-weighted reconstruction)."""
        p = self.probability.astype(np.float64)
        return p / np.maximum(p.sum(axis=1, keepdims=True), 1e-300)

    def distribution(self, particle: int) -> np.ndarray:
        """``(G,)`` grid distribution of one particle: its top-``k`` probabilities, 0 elsewhere."""
        if not 0 <= int(particle) < self.index.shape[0]:
            raise IndexError(f"particle {particle} is out of range: the file holds {len(self)}")
        out = np.zeros(grids.healpix_so3_grid_size(self.level))
        out[self.index[int(particle)]] = self.probability[int(particle)]
        return out

    def __len__(self) -> int:
        return int(self.index.shape[0])


def load_topk(output_star: str | os.PathLike[str]) -> TopK:
    """Read the top-k side file written beside ``output_star`` by :func:`predict_star`."""
    path = topk_path(output_star)
    if not path.is_file():
        raise FileNotFoundError(
            f"no top-k side file {path} beside {output_star}; run cryosphere predict to make it"
        )
    with np.load(path) as data:
        searched = "searched_index" in data.files
        return TopK(
            index=data["top_index"],
            probability=data["top_probability"],
            image_name=data["image_name"],
            level=int(data["grid_level"]),
            searched_index=data["searched_index"] if searched else None,
            searched_probability=data["searched_probability"] if searched else None,
            searched_shift_px=data["searched_shift_px"] if searched else None,
            searched_level=int(data["refine_level"]) if searched else None,
        )
