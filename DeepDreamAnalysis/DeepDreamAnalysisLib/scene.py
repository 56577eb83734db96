"""The MRML bridge: volumes in, results out as Slicer nodes.

This is the only engine module that imports ``slicer`` and ``vtk`` (never ``qt``): it runs inside
Slicer and, headless, with the ``slicer-core`` package (that is how CI tests it). Every function
here must be called from the thread that owns the scene (Slicer's main thread); the worker thread
never touches MRML.

Geometry conventions:

- Arrays are ``[k, j, i]`` (``slicer.util.arrayFromVolume`` order). Crops (``result.Crop``) hold
  ``(k, j, i)`` start and size.
- Slicer stores geometry in RAS; :class:`~.volume.Volume` holds LPS (as SimpleITK and the engine
  do). :func:`volume_from_node` converts (``LPS = diag(-1, -1, 1) @ RAS``).
- Output image and mask are **crop-sized** (the region the loop works on), placed with the
  input's IJK-to-RAS shifted by the crop start, and under the input's parent transform. Shown as
  the foreground layer over the input they look pasted into it; memory stays bounded whatever the
  size of the input. The sequences are crop-sized too.

Output nodes of one run (each carries the attributes ``DeepDreamAnalysis.Role`` and
``DeepDreamAnalysis.RunId``): the dream image (scalar volume), the mask (segmentation referencing
the input's geometry, one segment), the curves (table node: ``iteration``, ``objective``,
``probability``, ``mask_voxels``, every feature raw and, with reference statistics, ``<name>_z``),
one plot series per feature, the normal band [-1, 1] (two constant series from a small table), a
chart, image and mask sequences indexed by iteration with a browser (created when the run ends),
and a text node with the run's metadata as JSON.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .errors import DeepDreamError, FeatureError, ImageError, SeedError
from .result import BASE_COLUMNS, AnalysisResult, Crop, Progress, Snapshot, Step
from .volume import Volume

log = logging.getLogger(__name__)

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
ATTR_ROLE = "DeepDreamAnalysis.Role"
ATTR_RUN = "DeepDreamAnalysis.RunId"
ATTR_INPUT = "DeepDreamAnalysis.InputVolumeID"
ATTR_STATUS = "DeepDreamAnalysis.Status"
ATTR_ITERATION = "DeepDreamAnalysis.Iteration"
SEGMENT_ID = "dream"
# Distinct colours for the feature curves (RGB 0..1), cycled.
PALETTE = (
    (0.12, 0.47, 0.71), (1.00, 0.50, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16),
    (0.58, 0.40, 0.74), (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.50, 0.50, 0.50),
    (0.74, 0.74, 0.13), (0.09, 0.75, 0.81),
)


def _scene(scene=None):
    scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise RuntimeError("No MRML scene: set slicer.mrmlScene (slicer-core) or pass scene=.")
    return scene


# ----------------------------------------------------------------------------- geometry

def ijk_to_ras(volumeNode) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of ``volumeNode`` (its own frame, without parent transforms)."""
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtk_matrix(a: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def crop_ijk_to_ras(ijkToRas: np.ndarray, crop: Crop) -> np.ndarray:
    """IJK-to-RAS of a crop: the input's matrix with its origin moved to the crop's first voxel."""
    k0, j0, i0 = crop.start
    shift = np.eye(4)
    shift[:3, 3] = (i0, j0, k0)
    return np.asarray(ijkToRas, float) @ shift


def volume_from_node(volumeNode) -> Volume:
    """A :class:`Volume` (float32 ``[k, j, i]``, LPS geometry) copied from a scalar volume node.

    The geometry is the node's own (local) frame; parent transforms are not applied (the outputs
    are placed under the same transform, so they overlay the input).
    """
    if volumeNode is None or not hasattr(volumeNode, "IsA"):
        raise ImageError(f"No input volume given ({volumeNode!r}). Select a scalar volume (a grey-level image "
                         "such as a CT) as the input.")
    name = volumeNode.GetName()
    if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ImageError(
            f"{name!r} is a label map (a segmentation), not an intensity image. Select the grey-level volume "
            "(the CT or MR) as the input; if this really is an intensity image loaded as a label map, convert it "
            "(Volumes module > Volume Information > Convert to scalar volume).")
    image = volumeNode.GetImageData() if volumeNode.IsA("vtkMRMLVolumeNode") else None
    components = image.GetNumberOfScalarComponents() if image is not None else 1
    if volumeNode.IsA("vtkMRMLVectorVolumeNode") or components != 1:
        raise ImageError(
            f"{name!r} is a vector volume with {components} value(s) per voxel (a colour, vector or multi-channel "
            "image); the analysis needs one grey value per voxel. Select a scalar volume, or extract one component "
            "first (Vector to Scalar Volume module).")
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLTensorVolumeNode"):
        raise ImageError(f"{name!r} is a {volumeNode.GetClassName()}, not a scalar volume. Select a scalar volume "
                         "(a grey-level image such as a CT) as the input.")
    if image is None:
        raise ImageError(f"Volume {name!r} holds no image data. Load an image first.")
    array = np.array(slicer.util.arrayFromVolume(volumeNode), dtype=np.float32, copy=True)
    dirs = np.zeros((3, 3))
    volumeNode.GetIJKToRASDirections(dirs)
    origin_ras = np.array(volumeNode.GetOrigin(), float)
    return Volume(array, tuple(volumeNode.GetSpacing()), tuple(RAS_TO_LPS @ origin_ras), RAS_TO_LPS @ dirs)


def _world_to_local(volumeNode, ras_world) -> np.ndarray:
    """World RAS -> the volume's local RAS, through its parent transforms (linear or not)."""
    parent = volumeNode.GetParentTransformNode()
    point = [float(v) for v in ras_world]
    if parent is None:
        return np.array(point)
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, parent, transform)
    return np.array(transform.TransformPoint(point))


def seed_ijk_from_ras(ras, volumeNode, world: bool = True) -> tuple[int, int, int]:
    """Voxel (i, j, k) of RAS point ``ras`` (mm): world coordinates (through the volume's parent
    transforms) when ``world``, else the volume's local RAS. Rounded; :class:`SeedError` outside."""
    try:
        ras = [float(v) for v in ras]
    except (TypeError, ValueError):
        raise SeedError(f"The seed position must be three numbers R, A, S (mm); got {ras!r}.") from None
    if len(ras) != 3 or not all(math.isfinite(v) for v in ras):
        raise SeedError(f"The seed position must be three finite numbers R, A, S (mm); got {ras!r}.")
    local = _world_to_local(volumeNode, ras) if world else np.array(ras)
    ijk = np.linalg.solve(ijk_to_ras(volumeNode), np.append(local, 1.0))[:3]
    seed = tuple(int(round(float(v))) for v in ijk)
    dims = volumeNode.GetImageData().GetDimensions() if volumeNode.GetImageData() else (0, 0, 0)
    if any(s < 0 or s >= n for s, n in zip(seed, dims)):
        raise SeedError(
            f"The seed at RAS ({ras[0]:.1f}, {ras[1]:.1f}, {ras[2]:.1f}) mm falls on voxel (i,j,k)={seed}, "
            f"outside {volumeNode.GetName()!r} (voxels (0,0,0) to {tuple(n - 1 for n in dims)}). "
            "Place the seed point inside the image."
        )
    return seed  # type: ignore[return-value]


def seed_ijk_from_markups(markupsNode, volumeNode, index: int | None = None) -> tuple[int, int, int]:
    """Voxel (i, j, k) under a markups control point: world -> volume RAS (through the volume's
    parent transforms) -> IJK, rounded, checked against the extent.

    ``index`` picks a control point; by default the last defined one (the panel keeps only the
    last placed point: :func:`keep_last_point`).
    """
    if markupsNode is None:
        raise SeedError("No seed point list. Place one seed point with the markups place button.")
    defined = [n for n in range(markupsNode.GetNumberOfControlPoints())
               if markupsNode.GetNthControlPointPositionStatus(n) == markupsNode.PositionDefined]
    if index is None:
        if not defined:
            raise SeedError(f"{markupsNode.GetName()!r} has no placed point. Place one seed point on the image.")
        index = defined[-1]
    elif index not in defined:
        raise SeedError(f"{markupsNode.GetName()!r} has no placed point number {index}.")
    world = [0.0, 0.0, 0.0]
    markupsNode.GetNthControlPointPositionWorld(index, world)
    return seed_ijk_from_ras(world, volumeNode, world=True)


SEED_ROLE = "seed"
"""``DeepDreamAnalysis.Role`` of the point list the panel made for the seed (found again, not
made anew, on the next module enter)."""


def find_or_make_seed_node(scene=None):
    """The panel's seed point list: the one tagged as the module's seed if the scene has one,
    else a new one. Uncapped: a point list full at its cap makes Slicer start a new list on the next
    click, so the panel keeps the list open and :func:`keep_last_point` moves the seed instead."""
    scene = _scene(scene)
    for n in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode")):
        node = scene.GetNthNodeByClass(n, "vtkMRMLMarkupsFiducialNode")
        if node.GetAttribute(ATTR_ROLE) == SEED_ROLE:
            return node
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "DeepDream seed")
    node.SetAttribute(ATTR_ROLE, SEED_ROLE)
    return node


def keep_last_point(markupsNode) -> None:
    """Remove every control point but the last placed one: placing the seed again moves it."""
    if markupsNode is None:
        return
    defined = [n for n in range(markupsNode.GetNumberOfControlPoints())
               if markupsNode.GetNthControlPointPositionStatus(n) == markupsNode.PositionDefined]
    if not defined:
        return
    keep = defined[-1]
    for n in reversed(range(markupsNode.GetNumberOfControlPoints())):
        if n != keep and markupsNode.GetNthControlPointPositionStatus(n) == markupsNode.PositionDefined:
            markupsNode.RemoveNthControlPoint(n)


def ras_from_ijk(ijk, volumeNode, world: bool = True) -> np.ndarray:
    """World (or local) RAS of voxel ``ijk`` (i, j, k): the inverse of :func:`seed_ijk_from_ras`."""
    local = (ijk_to_ras(volumeNode) @ np.append(np.asarray(ijk, float), 1.0))[:3]
    parent = volumeNode.GetParentTransformNode()
    if not world or parent is None:
        return local
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, transform)
    return np.array(transform.TransformPoint([float(v) for v in local]))


# ----------------------------------------------------------------------------- outputs

@dataclass
class SceneOptions:
    """How results become nodes.

    ``record_every``: iterations between two items of the image/mask sequences (at least; the
    runner may drop snapshots). ``max_sequence_items``: cap on items; beyond it every other item is
    dropped and the interval doubles, so memory stays below ``max_sequence_items`` x crop size x 5
    bytes (float32 image + uint8 mask). ``new_nodes``: True makes a new set of nodes per run;
    False replaces the nodes of the last run.
    """

    record_every: int = 10
    max_sequence_items: int = 100
    new_nodes: bool = False
    name: str | None = None
    """Base name of the output nodes; default ``DeepDream <input name>``."""

    def __post_init__(self):
        if int(self.record_every) < 1:
            raise ValueError(f"record_every must be a positive integer, got {self.record_every!r}.")
        if int(self.max_sequence_items) < 2:
            raise ValueError(f"max_sequence_items must be at least 2, got {self.max_sequence_items!r}.")
        self.record_every = int(self.record_every)
        self.max_sequence_items = int(self.max_sequence_items)


ROLES = ("image", "mask", "table", "band", "band_low", "band_high", "chart", "imageSequence", "maskSequence", "browser", "metadata")


class ResultNodes:
    """The nodes of one run, looked up by ID each time (a node the user deleted reads as None)."""

    def __init__(self, scene, run_id: str):
        self.scene = scene
        self.run_id = run_id
        self.ids: dict[str, str] = {}
        self.series_ids: dict[str, str] = {}

    def get(self, role: str):
        node_id = self.ids.get(role)
        return self.scene.GetNodeByID(node_id) if node_id else None

    def series(self, feature: str):
        node_id = self.series_ids.get(feature)
        return self.scene.GetNodeByID(node_id) if node_id else None

    image = property(lambda self: self.get("image"))
    mask = property(lambda self: self.get("mask"))
    table = property(lambda self: self.get("table"))
    chart = property(lambda self: self.get("chart"))
    imageSequence = property(lambda self: self.get("imageSequence"))
    maskSequence = property(lambda self: self.get("maskSequence"))
    browser = property(lambda self: self.get("browser"))
    metadata = property(lambda self: self.get("metadata"))

    def all_nodes(self) -> list:
        nodes = [self.get(r) for r in ROLES] + [self.series(f) for f in self.series_ids]
        return [n for n in nodes if n is not None]


def find_run_nodes(scene=None, run_id: str | None = None) -> list:
    """Nodes made by this module, of one run (default: the latest run in the scene)."""
    scene = _scene(scene)
    ours = []
    for n in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(n)
        if node is not None and node.GetAttribute(ATTR_RUN):
            ours.append(node)
    if not ours:
        return []
    if run_id is None:
        run_id = max((node.GetAttribute(ATTR_RUN) for node in ours), key=_run_key)
    return [node for node in ours if node.GetAttribute(ATTR_RUN) == run_id]


def _run_key(run_id: str):
    try:
        return (0, int(run_id))
    except ValueError:
        return (1, run_id)


def remove_run_nodes(scene=None, run_id: str | None = None) -> int:
    """Remove the nodes of one run (default: the latest), with their display and storage nodes."""
    scene = _scene(scene)
    nodes = find_run_nodes(scene, run_id)
    # Browsers first: removing one with its proxies still observed is the order Slicer uses.
    nodes.sort(key=lambda nd: 0 if nd.IsA("vtkMRMLSequenceBrowserNode") else 1)
    for node in nodes:
        if scene.IsNodePresent(node):
            _remove_with_display(scene, node)
    return len(nodes)


def _remove_with_display(scene, node) -> None:
    extra = []
    if hasattr(node, "GetNumberOfDisplayNodes"):
        extra += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if hasattr(node, "GetNumberOfStorageNodes"):
        extra += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for e in extra:
        if e is not None and scene.IsNodePresent(e):
            scene.RemoveNode(e)


class SceneUpdater:
    """Creates the output nodes of one run once, then updates them in place from the run's
    :class:`~.result.Progress` reports (:meth:`update`, one call per drain) and its final
    :class:`~.result.AnalysisResult` (:meth:`finish`).

    Each update is a batch: every node is modified once per call (``StartModify``/``EndModify``),
    so the chart redraws once per drain, not once per row. A node deleted while the run goes on is
    recreated on the next update (the table and chart with every row so far; the sequences start
    again empty); nothing raises.

    ``crop`` is where the loop works in the input (see :func:`~.dream.crop_around_seed`).
    ``reference``: the run's ReferenceStats (z-score columns and the normal band) or None.
    """

    def __init__(self, inputNode, crop: Crop, feature_names: Iterable[str], reference=None,
                 total_iterations: int | None = None, options: SceneOptions | None = None,
                 scene=None, metadata: dict[str, Any] | None = None):
        self.scene = _scene(scene)
        self.options = options or SceneOptions()
        if inputNode is None or inputNode.GetImageData() is None:
            raise ImageError("The input volume is missing or empty; select a loaded volume.")
        self.crop = crop
        self.feature_names = tuple(feature_names)
        self.reference = reference
        self.total_iterations = total_iterations
        self.input_id = inputNode.GetID()
        self.input_name = inputNode.GetName()
        self.transform_id = inputNode.GetTransformNodeID()
        self.input_ijk_to_ras = ijk_to_ras(inputNode)
        self.crop_ijk_to_ras = crop_ijk_to_ras(self.input_ijk_to_ras, crop)
        self.input_dims = inputNode.GetImageData().GetDimensions()
        self._window_level = None
        display = inputNode.GetDisplayNode()
        if display is not None and display.IsA("vtkMRMLScalarVolumeDisplayNode"):
            self._window_level = (display.GetWindow(), display.GetLevel(), display.GetColorNodeID())
        self.base_name = self.options.name or f"DeepDream {self.input_name}"
        self.zscored = tuple(f for f in self.feature_names
                             if reference is not None and self._has_reference(f))
        self.columns = list(BASE_COLUMNS) + list(self.feature_names) + [f"{f}_z" for f in self.zscored]
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.status = "running"
        self.last_iteration: int | None = None
        self.last_snapshot_iteration: int | None = None
        self._rows: list[Step] = []  # every step so far, in order
        self._row_of: dict[int, int] = {}  # iteration -> row index
        self._recorded: list[int] = []  # iterations held by the sequences
        self._record_every = self.options.record_every
        self._latest_snapshot: Snapshot | None = None
        self._last_recorded_snapshot: Snapshot | None = None
        self._labelmap = self._make_labelmap()
        if not self.options.new_nodes:
            remove_run_nodes(self.scene)
        self.run_id = str(time.time_ns())
        self.nodes = ResultNodes(self.scene, self.run_id)
        self._ensure_all()

    # --- public ------------------------------------------------------------------------------

    def update(self, progresses: Iterable[Progress]) -> int:
        """Apply a drain's worth of reports (oldest first); return the number of steps added."""
        progresses = list(progresses)
        if not progresses:
            return 0
        self._ensure_all()
        new_steps: list[Step] = []
        changed_rows: list[int] = []
        for p in progresses:
            step = p.step
            if step.iteration in self._row_of:
                self._rows[self._row_of[step.iteration]] = step
                changed_rows.append(self._row_of[step.iteration])
            else:
                self._row_of[step.iteration] = len(self._rows)
                self._rows.append(step)
                new_steps.append(step)
            for late in getattr(p, "late_steps", None) or []:
                row = self._row_of.get(late.iteration)
                if row is not None:
                    self._rows[row] = late
                    changed_rows.append(row)
            if p.total_iterations:
                self.total_iterations = p.total_iterations
            if p.snapshot is not None:
                self._latest_snapshot = p.snapshot
                if self._due_for_recording(p.snapshot.iteration):
                    self._record(p.snapshot)
        self.last_iteration = progresses[-1].step.iteration
        self._append_rows(new_steps, changed_rows)
        if self._latest_snapshot is not None and self._latest_snapshot.iteration != self.last_snapshot_iteration:
            self._show_snapshot(self._latest_snapshot)
        self._set_attribute_all(ATTR_ITERATION, str(self.last_iteration))
        return len(new_steps)

    def finish(self, result: AnalysisResult | None, status: str | None = None,
               metadata: dict[str, Any] | None = None) -> ResultNodes:
        """The run ended (completed, stopped, cancelled or fault): complete the table from the
        result, show and record the last snapshot, create the sequence browser, store metadata."""
        self._ensure_all()
        if result is not None:
            self.status = result.status
            self.metadata.update(result.metadata or {})
            self._rows = list(result.steps)
            self._row_of = {s.iteration: n for n, s in enumerate(self._rows)}
            self._rewrite_table()
            last = result.snapshots[-1] if result.snapshots else self._latest_snapshot
        else:
            last = self._latest_snapshot
        if status is not None:
            self.status = status
        if metadata:
            self.metadata.update(metadata)
        if last is not None:
            if last.iteration != self.last_snapshot_iteration:
                self._show_snapshot(last)
            if not self._recorded or self._recorded[-1] != last.iteration:
                self._record(last)
        self._make_browser()
        self.metadata["status"] = self.status
        self._write_metadata()
        self._set_attribute_all(ATTR_STATUS, self.status)
        return self.nodes

    def mark_stopped(self, status: str = "cancelled", reason: str = "") -> None:
        """The run was left (module reload, Slicer quitting) while its nodes stay in the scene: tag
        them ``status`` instead of ``running``, without creating any node that is missing."""
        self.status = status
        self.metadata["status"] = status
        if reason:
            self.metadata["cancelled"] = reason
        self._write_metadata()
        self._set_attribute_all(ATTR_STATUS, status)

    # --- node creation -----------------------------------------------------------------------

    def _tag(self, node, role: str) -> None:
        node.SetAttribute(ATTR_ROLE, role)
        node.SetAttribute(ATTR_RUN, self.run_id)
        node.SetAttribute(ATTR_INPUT, self.input_id or "")
        node.SetAttribute(ATTR_STATUS, self.status)

    def _new(self, cls: str, role: str, name: str):
        node = self.scene.AddNewNodeByClass(cls, self.scene.GenerateUniqueName(name))
        self._tag(node, role)
        self.nodes.ids[role] = node.GetID()
        return node

    def _ensure_all(self) -> None:
        """Create whatever node is missing (first call, or the user deleted one) and re-link the
        plot series to their tables and the chart."""
        for role in ("image", "mask", "table", "band", "chart", "imageSequence", "maskSequence", "metadata"):
            if role == "band" and not self.zscored:
                continue
            if self.nodes.get(role) is None:
                getattr(self, f"_make_{role}")()
        table, band, chart = self.nodes.table, self.nodes.get("band"), self.nodes.chart
        wanted = []
        for n, feature in enumerate(self.feature_names):
            series = self.nodes.series(feature) or self._make_series(feature, n)
            wanted.append((series, table))
        if band is not None:
            for bound in ("low", "high"):
                wanted.append((self.nodes.get(f"band_{bound}") or self._make_band_series(bound), band))
        for series, source in wanted:
            if source is not None and series.GetTableNodeID() != source.GetID():
                series.SetAndObserveTableNodeID(source.GetID())
            if chart is not None and not chart.HasPlotSeriesNodeID(series.GetID()):
                chart.AddAndObservePlotSeriesNodeID(series.GetID())

    def _make_image(self):
        node = self._new("vtkMRMLScalarVolumeNode", "image", f"{self.base_name} image")
        k, j, i = self.crop.size
        image = vtk.vtkImageData()
        image.SetDimensions(i, j, k)
        image.AllocateScalars(vtk.VTK_FLOAT, 1)
        image.GetPointData().GetScalars().Fill(0.0)
        node.SetAndObserveImageData(image)
        node.SetIJKToRASMatrix(_vtk_matrix(self.crop_ijk_to_ras))
        node.SetAndObserveTransformNodeID(self.transform_id)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None and self._window_level is not None:
            window, level, color = self._window_level
            display.AutoWindowLevelOff()
            display.SetWindowLevel(window, level)
            if color:
                display.SetAndObserveColorNodeID(color)
        self.last_snapshot_iteration = None
        if self._latest_snapshot is not None:
            self._show_snapshot(self._latest_snapshot)
        return node

    def _make_mask(self):
        node = self._new("vtkMRMLSegmentationNode", "mask", f"{self.base_name} mask")
        input_node = self.scene.GetNodeByID(self.input_id) if self.input_id else None
        if input_node is not None:
            node.SetReferenceImageGeometryParameterFromVolumeNode(input_node)
        else:
            geometry = vtk.vtkMatrix4x4()
            geometry.DeepCopy(_vtk_matrix(self.input_ijk_to_ras))
            d = self.input_dims
            serial = slicer.vtkSegmentationConverter.SerializeImageGeometry(
                geometry, [0, d[0] - 1, 0, d[1] - 1, 0, d[2] - 1])
            node.GetSegmentation().SetConversionParameter(
                slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), serial)
        node.SetAndObserveTransformNodeID(self.transform_id)
        node.GetSegmentation().AddEmptySegment(SEGMENT_ID, "dreamed object", [1.0, 0.55, 0.0])
        node.CreateDefaultDisplayNodes()
        if self._latest_snapshot is not None:
            self._write_mask(node, self._latest_snapshot.mask)
        return node

    def _make_table(self):
        node = self._new("vtkMRMLTableNode", "table", f"{self.base_name} curves")
        table = node.GetTable()
        for name in self.columns:
            array = vtk.vtkDoubleArray()
            array.SetName(name)
            table.AddColumn(array)
        self._rewrite_table(node)
        return node

    def _make_band(self):
        node = self._new("vtkMRMLTableNode", "band", f"{self.base_name} normal band")
        table = node.GetTable()
        for name in ("iteration", "low", "high"):
            array = vtk.vtkDoubleArray()
            array.SetName(name)
            table.AddColumn(array)
        self._write_band(node)
        return node

    def _write_band(self, node=None) -> None:
        node = node or self.nodes.get("band")
        if node is None:
            return
        table = node.GetTable()
        last = max(float(self.total_iterations or 0), float(self.last_iteration or 0), 1.0)
        table.SetNumberOfRows(2)
        for row, x in enumerate((0.0, last)):
            table.SetValue(row, 0, x)
            table.SetValue(row, 1, -1.0)
            table.SetValue(row, 2, 1.0)
        table.Modified()
        node.Modified()

    def _make_chart(self):
        node = self._new("vtkMRMLPlotChartNode", "chart", f"{self.base_name} chart")
        node.SetTitle(f"DeepDream features ({'z-score' if self.zscored else 'raw values'})")
        node.SetXAxisTitle("iteration")
        node.SetYAxisTitle("z-score (normal range: -1 to 1)" if self.zscored else "feature value")
        node.SetLegendVisibility(True)
        return node

    def _make_band_series(self, bound: str):
        node = self._new("vtkMRMLPlotSeriesNode", f"band_{bound}", f"{self.base_name} normal {bound}")
        node.SetXColumnName("iteration")
        node.SetYColumnName(bound)
        node.SetPlotType(node.PlotTypeScatter)
        node.SetLineStyle(node.LineStyleDash)
        node.SetMarkerStyle(node.MarkerStyleNone)
        node.SetColor(0.45, 0.45, 0.45)
        return node

    def _make_series(self, feature: str, n: int):
        node = self.scene.AddNewNodeByClass(
            "vtkMRMLPlotSeriesNode", self.scene.GenerateUniqueName(f"{self.base_name} {feature}"))
        self._tag(node, f"series:{feature}")
        self.nodes.series_ids[feature] = node.GetID()
        node.SetXColumnName("iteration")
        node.SetYColumnName(f"{feature}_z" if feature in self.zscored else feature)
        node.SetPlotType(node.PlotTypeScatter)
        node.SetMarkerStyle(node.MarkerStyleNone)
        node.SetLineStyle(node.LineStyleSolid)
        node.SetColor(*PALETTE[n % len(PALETTE)])
        return node

    def _make_sequence(self, role: str, what: str):
        node = self._new("vtkMRMLSequenceNode", role, f"{self.base_name} {what} sequence")
        node.SetIndexName("iteration")
        node.SetIndexUnit("")
        node.SetIndexType(node.NumericIndex)
        return node

    def _make_imageSequence(self):
        self._recorded = []
        other = self.nodes.maskSequence
        if other is not None:
            other.RemoveAllDataNodes()
        return self._make_sequence("imageSequence", "image")

    def _make_maskSequence(self):
        self._recorded = []
        other = self.nodes.imageSequence
        if other is not None:
            other.RemoveAllDataNodes()
        return self._make_sequence("maskSequence", "mask")

    def _make_metadata(self):
        node = self._new("vtkMRMLTextNode", "metadata", f"{self.base_name} run metadata")
        self._write_metadata(node)
        return node

    def _make_browser(self):
        image_seq, mask_seq = self.nodes.imageSequence, self.nodes.maskSequence
        if image_seq is None or mask_seq is None or image_seq.GetNumberOfDataNodes() == 0:
            return None
        browser = self.nodes.browser
        if browser is None:
            browser = self._new("vtkMRMLSequenceBrowserNode", "browser", f"{self.base_name} browser")
            browser.SetAndObserveMasterSequenceNodeID(image_seq.GetID())
            browser.AddSynchronizedSequenceNodeID(mask_seq.GetID())
            # The live nodes become the proxies: scrubbing shows the recorded iterations in them.
            for sequence, proxy in ((image_seq, self.nodes.image), (mask_seq, self.nodes.mask)):
                if proxy is not None:
                    browser.AddProxyNode(proxy, sequence, False)
                browser.SetSaveChanges(sequence, False)
        browser.SetSelectedItemNumber(image_seq.GetNumberOfDataNodes() - 1)
        return browser

    # --- node updates ------------------------------------------------------------------------

    def _has_reference(self, feature: str) -> bool:
        try:
            return feature in self.reference
        except TypeError:
            return False

    def _z(self, feature: str, value: float) -> float:
        if value is None or not math.isfinite(value):
            return math.nan
        try:
            return float(np.asarray(self.reference.zscore(feature, np.array([value], float))).ravel()[0])
        except Exception:  # noqa: BLE001 - a bad reference entry shows as a gap, never a failed drain
            return math.nan

    def _row_values(self, step: Step) -> list[float]:
        values = [float(step.iteration), float(step.objective), float(step.probability), float(step.mask_voxels)]
        raw = [float(step.features.get(f, math.nan)) for f in self.feature_names]
        values += raw
        values += [self._z(f, float(step.features.get(f, math.nan))) for f in self.zscored]
        return values

    def _append_rows(self, steps: list[Step], changed_rows: list[int]) -> None:
        node = self.nodes.table
        if node is None or (not steps and not changed_rows):
            return
        table = node.GetTable()
        was = node.StartModify()
        if table.GetNumberOfRows() + len(steps) != len(self._rows) or table.GetNumberOfColumns() != len(self.columns):
            self._rewrite_table(node)
        else:
            for step in steps:
                for c, value in enumerate(self._row_values(step)):
                    table.GetColumn(c).InsertNextValue(value)
            for row in set(changed_rows):
                for c, value in enumerate(self._row_values(self._rows[row])):
                    table.GetColumn(c).SetValue(row, value)
            for c in range(table.GetNumberOfColumns()):
                table.GetColumn(c).Modified()
            table.Modified()
            node.Modified()
        node.EndModify(was)
        if self.zscored and self.total_iterations is None:
            self._write_band()

    def _rewrite_table(self, node=None) -> None:
        node = node or self.nodes.table
        if node is None:
            return
        was = node.StartModify()
        table = node.GetTable()
        if table.GetNumberOfColumns() != len(self.columns):
            table.Initialize()
            for name in self.columns:
                array = vtk.vtkDoubleArray()
                array.SetName(name)
                table.AddColumn(array)
        rows = np.array([self._row_values(s) for s in self._rows], dtype=float).reshape(-1, len(self.columns))
        for c in range(len(self.columns)):
            column = table.GetColumn(c)
            column.SetNumberOfTuples(rows.shape[0])
            numpy_support.vtk_to_numpy(column)[:] = rows[:, c]
            column.Modified()
        table.Modified()
        node.Modified()
        node.EndModify(was)
        self._write_band()

    def _show_snapshot(self, snapshot: Snapshot) -> None:
        image = self.nodes.image
        if image is not None:
            self._write_image(image, snapshot.image)
        mask = self.nodes.mask
        if mask is not None:
            self._write_mask(mask, snapshot.mask)
        self.last_snapshot_iteration = snapshot.iteration

    def _check_shape(self, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        if array.ndim == 2:
            array = array[np.newaxis]
        if tuple(array.shape) != tuple(self.crop.size):
            raise ValueError(f"Snapshot of shape {array.shape} does not match the crop {self.crop.size} (k, j, i).")
        return array

    def _write_image(self, node, array: np.ndarray) -> None:
        array = self._check_shape(array)
        was = node.StartModify()
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array, dtype=np.float32))
        node.SetIJKToRASMatrix(_vtk_matrix(self.crop_ijk_to_ras))
        node.EndModify(was)

    def _make_labelmap(self):
        """A reusable crop-sized labelmap in the input's voxel grid (extent = the crop)."""
        labelmap = slicer.vtkOrientedImageData()
        labelmap.SetImageToWorldMatrix(_vtk_matrix(self.input_ijk_to_ras))
        (k0, j0, i0), (dk, dj, di) = self.crop.start, self.crop.size
        labelmap.SetExtent(i0, i0 + di - 1, j0, j0 + dj - 1, k0, k0 + dk - 1)
        labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        return labelmap

    def _write_mask(self, node, mask: np.ndarray) -> None:
        mask = self._check_shape(mask)
        segmentation = node.GetSegmentation()
        if segmentation.GetSegment(SEGMENT_ID) is None:
            segmentation.AddEmptySegment(SEGMENT_ID, "dreamed object", [1.0, 0.55, 0.0])
        scalars = numpy_support.vtk_to_numpy(self._labelmap.GetPointData().GetScalars())
        scalars[:] = np.asarray(mask, dtype=np.uint8).ravel()
        self._labelmap.Modified()
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            self._labelmap, node, SEGMENT_ID, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE,
            self._labelmap.GetExtent())

    def _due_for_recording(self, iteration: int) -> bool:
        return not self._recorded or iteration - self._recorded[-1] >= self._record_every

    def _record(self, snapshot: Snapshot) -> None:
        """Add a snapshot to the image and mask sequences (through the live nodes, which are
        updated to it first), then thin the sequences if they pass the cap."""
        image_seq, mask_seq = self.nodes.imageSequence, self.nodes.maskSequence
        image, mask = self.nodes.image, self.nodes.mask
        if image_seq is None or mask_seq is None or image is None or mask is None:
            return
        if snapshot.iteration in self._recorded:
            return
        if self.last_snapshot_iteration != snapshot.iteration:
            self._show_snapshot(snapshot)
        value = str(int(snapshot.iteration))
        image_seq.SetDataNodeAtValue(image, value)
        mask_seq.SetDataNodeAtValue(mask, value)
        self._recorded.append(int(snapshot.iteration))
        if len(self._recorded) > self.options.max_sequence_items:
            self._thin()

    def _thin(self) -> None:
        """Drop every other recorded item (the first and last stay); double the interval."""
        keep = set(self._recorded[::2]) | {self._recorded[-1]}
        for it in self._recorded:
            if it not in keep:
                for seq in (self.nodes.imageSequence, self.nodes.maskSequence):
                    if seq is not None:
                        seq.RemoveDataNodeAtValue(str(it))
        self._recorded = [it for it in self._recorded if it in keep]
        self._record_every *= 2

    @property
    def recorded_iterations(self) -> list[int]:
        return list(self._recorded)

    def _write_metadata(self, node=None) -> None:
        node = node or self.nodes.metadata
        if node is None:
            return
        payload = dict(self.metadata)
        payload.setdefault("status", self.status)
        payload["slicer"] = {
            "input_volume": self.input_name,
            "crop_start_kji": list(self.crop.start),
            "crop_size_kji": list(self.crop.size),
            "recorded_iterations": list(self._recorded),
        }
        node.SetText(json.dumps(payload, indent=2, default=_json_default))
        for key in ("status", "model", "device", "seed_ijk"):
            if key in payload:
                node.SetAttribute(f"DeepDreamAnalysis.{key}", json.dumps(payload[key], default=_json_default))

    def _set_attribute_all(self, name: str, value: str) -> None:
        if name == ATTR_STATUS:  # the recorded items too, or scrubbing would bring back "running"
            for seq in (self.nodes.imageSequence, self.nodes.maskSequence):
                for n in range(seq.GetNumberOfDataNodes() if seq is not None else 0):
                    seq.GetNthDataNode(n).SetAttribute(name, value)
        for node in self.nodes.all_nodes():  # after the items: a modified item refreshes its proxy
            node.SetAttribute(name, value)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def show_result(result: AnalysisResult, inputNode, options: SceneOptions | None = None, scene=None) -> ResultNodes:
    """Nodes for a finished result (for example one computed from a script or loaded from disk)."""
    updater = SceneUpdater(inputNode, result.crop, result.feature_names, result.reference,
                           total_iterations=(result.steps[-1].iteration + 1) if result.steps else None,
                           options=options, scene=scene, metadata=result.metadata)
    snapshots = {s.iteration: s for s in result.snapshots}
    updater.update([Progress(step, snapshots.get(step.iteration), len(result.steps), 0.0, 0.0)
                    for step in result.steps])
    return updater.finish(result)


# ----------------------------------------------------------------------------- several runs in one chart

ATTR_CHART = "DeepDreamAnalysis.ChartID"
ATTR_COMPARISON = "DeepDreamAnalysis.ComparisonId"


def _has_column(table_node, name: str) -> bool:
    return table_node.GetTable().GetColumnByName(name) is not None


def _feature_columns(table_node) -> list[str]:
    table = table_node.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return [n for n in names if n not in BASE_COLUMNS and not n.endswith("_z")]


def _run_table(run, scene):
    """The curves table of ``run``: a :class:`ResultNodes`, anything with ``.nodes`` (a
    ``RunHandle``), a curves table node, or a run ID (``DeepDreamAnalysis.RunId``)."""
    if isinstance(run, str):
        tables = [n for n in find_run_nodes(scene, run) if n.GetAttribute(ATTR_ROLE) == "table"]
        if not tables:
            raise DeepDreamError(f"No curves table of run {run!r} in the scene (deleted, or not a run ID).")
        return tables[0]
    nodes = getattr(run, "nodes", run)
    if isinstance(nodes, ResultNodes):
        if nodes.table is None:
            raise DeepDreamError(f"The curves table of run {nodes.run_id} was deleted; it cannot be charted.")
        return nodes.table
    if hasattr(run, "IsA") and run.IsA("vtkMRMLTableNode"):
        if not scene.IsNodePresent(run):
            raise DeepDreamError(f"The table {run.GetName()!r} is not in the scene (deleted?).")
        if not _has_column(run, "iteration"):
            raise DeepDreamError(f"The table {run.GetName()!r} has no 'iteration' column: it is not a DeepDream "
                                 "curves table.")
        return run
    raise DeepDreamError(f"Cannot chart {run!r}: give run handles, result nodes (handle.nodes), curves table nodes "
                         "or run IDs.")


def _default_label(table_node) -> str:
    label = table_node.GetName()
    if label.endswith(" curves"):
        label = label[: -len(" curves")]
    seed = table_node.GetAttribute(ATTR_RUN) and _run_attribute(table_node, "DeepDreamAnalysis.seed_ijk")
    if seed:
        label += f" seed {tuple(seed)}"
    return label


def _run_attribute(table_node, key: str):
    """A JSON attribute of the run's metadata node (the run of ``table_node``), or None."""
    scene = table_node.GetScene()
    if scene is None:
        return None
    for node in find_run_nodes(scene, table_node.GetAttribute(ATTR_RUN)):
        if node.GetAttribute(ATTR_ROLE) == "metadata" and node.GetAttribute(key):
            try:
                return json.loads(node.GetAttribute(key))
            except ValueError:
                return None
    return None


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def _style_series(node, colour, dashed: bool = False, width: int = 2) -> None:
    node.SetPlotType(node.PlotTypeScatter)
    node.SetMarkerStyle(node.MarkerStyleNone)
    node.SetLineStyle(node.LineStyleDash if dashed else node.LineStyleSolid)
    node.SetLineWidth(width)
    node.SetColor(*colour)


def _band_nodes(scene, first: float, last: float, base_name: str, tag: dict[str, str]) -> list:
    """A two-row table [first, last] x [-1, 1] and its two dashed grey series (the normal band)."""
    band = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{base_name} normal band"))
    table = band.GetTable()
    for name in ("iteration", "low", "high"):
        array = vtk.vtkDoubleArray()
        array.SetName(name)
        table.AddColumn(array)
    table.SetNumberOfRows(2)
    for row, x in enumerate((float(first), float(max(last, first + 1)))):
        table.SetValue(row, 0, x)
        table.SetValue(row, 1, -1.0)
        table.SetValue(row, 2, 1.0)
    nodes = [band]
    for bound in ("low", "high"):
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode",
                                         scene.GenerateUniqueName(f"{base_name} normal {bound}"))
        series.SetAndObserveTableNodeID(band.GetID())
        series.SetXColumnName("iteration")
        series.SetYColumnName(bound)
        _style_series(series, (0.45, 0.45, 0.45), dashed=True, width=1)
        nodes.append(series)
    for node in nodes:
        for key, value in tag.items():
            node.SetAttribute(key, value)
    return nodes


def remove_chart(chart, scene=None) -> int:
    """Remove a chart made by :func:`show_runs_in_chart` or :func:`show_comparison` with the
    series and band tables made for it (the runs' own tables stay). Returns the number removed."""
    scene = _scene(scene)
    if chart is None or not scene.IsNodePresent(chart):
        return 0
    chart_id = chart.GetID()
    made = [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())]
    made = [n for n in made if n is not None and n.GetAttribute(ATTR_CHART) == chart_id]
    for node in made:
        _remove_with_display(scene, node)
    scene.RemoveNode(chart)
    return len(made) + 1


def show_runs_in_chart(runs, feature: str, labels: list[str] | None = None, kind: str = "auto", chart=None,
                       scene=None, title: str | None = None):
    """One chart with one curve per run for ``feature`` (and the normal band [-1, 1] for z-scores).

    ``runs``: run handles (``logic.handle``), result nodes (``handle.nodes``), curves table nodes or
    run IDs, in the order of the legend; the runs' own tables are plotted (nothing is copied, so a
    run still going on grows in this chart too). ``kind``: ``z`` (the ``<feature>_z`` columns;
    every run needs reference statistics), ``raw`` (feature values), or ``auto`` (z when every run
    has z-scores, else raw: units are never mixed in one chart). ``labels``: legend names (default:
    the table name without " curves", and the seed). ``chart``: a chart made by this function to
    reuse (its previous curves are removed). Returns the chart node; show it with
    ``slicer.modules.plots.logic().ShowChartInLayout(chart)``; :func:`remove_chart` removes it.
    """
    scene = _scene(scene)
    tables = [_run_table(r, scene) for r in runs]
    if not tables:
        raise DeepDreamError("Give at least one run to chart.")
    if labels is None:
        labels = _unique([_default_label(t) for t in tables])
    elif len(labels) != len(tables):
        raise DeepDreamError(f"{len(labels)} labels for {len(tables)} runs: give one label per run.")
    if kind not in ("auto", "z", "raw"):
        raise DeepDreamError(f"kind must be 'auto', 'z' or 'raw'; got {kind!r}.")
    has_z = [_has_column(t, f"{feature}_z") for t in tables]
    if kind == "auto":
        kind = "z" if all(has_z) else "raw"
    column = f"{feature}_z" if kind == "z" else feature
    missing = [t.GetName() for t in tables if not _has_column(t, column)]
    if missing:
        known = sorted({f for t in tables for f in _feature_columns(t)})
        what = "z-scores" if kind == "z" else "values"
        hint = (" (run without reference statistics for it: run it with referencePath=..., or chart kind='raw')"
                if kind == "z" else "")
        raise FeatureError(f"No {what} of {feature!r} in {', '.join(repr(m) for m in missing)}{hint}. "
                           f"Features of these runs: {', '.join(known) or 'none'}.")
    if chart is None:
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode",
                                        scene.GenerateUniqueName(f"DeepDream {feature} ({len(tables)} runs)"))
        chart.SetAttribute(ATTR_ROLE, "runs chart")
    else:
        for node in [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())]:
            if node is not None and node.GetAttribute(ATTR_CHART) == chart.GetID():
                _remove_with_display(scene, node)
        chart.RemoveAllPlotSeriesNodeIDs()
    was = chart.StartModify()
    chart.SetTitle(title or f"{feature} ({'z-score' if kind == 'z' else 'raw value'}), {len(tables)} runs")
    chart.SetXAxisTitle("iteration")
    chart.SetYAxisTitle("z-score (normal range: -1 to 1)" if kind == "z" else feature)
    chart.SetLegendVisibility(True)
    tag = {ATTR_CHART: chart.GetID(), ATTR_ROLE: "runs chart series"}
    last = 0.0
    for n, (table, label) in enumerate(zip(tables, labels)):
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(label))
        for key, value in tag.items():
            series.SetAttribute(key, value)
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("iteration")
        series.SetYColumnName(column)
        _style_series(series, PALETTE[n % len(PALETTE)])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        iterations = slicer.util.arrayFromTableColumn(table, "iteration")
        if len(iterations):
            last = max(last, float(np.nanmax(iterations)))
    if kind == "z":
        for node in _band_nodes(scene, 0.0, last, chart.GetName(), {ATTR_CHART: chart.GetID(),
                                                                    ATTR_ROLE: "runs chart band"})[1:]:
            chart.AddAndObservePlotSeriesNodeID(node.GetID())
    chart.EndModify(was)
    return chart


# ----------------------------------------------------------------------------- a comparison of models

COMPARISON_STATS = ("mean", "std", "min", "max")


@dataclass
class ComparisonNodes:
    """The nodes of a shown ``compare.Comparison`` (see :func:`show_comparison`): one table per
    model (``tables[model]``), one chart, a text node with the comparison's metadata as JSON."""

    scene: Any
    comparison_id: str
    table_ids: dict[str, str]
    chart_id: str
    metadata_id: str
    series_ids: dict[tuple[str, str], str]  # (model, statistic) -> series
    band_ids: list[str]
    feature: str
    normalised: bool

    @property
    def tables(self) -> dict[str, Any]:
        return {m: self.scene.GetNodeByID(i) for m, i in self.table_ids.items()}

    @property
    def chart(self):
        return self.scene.GetNodeByID(self.chart_id)

    @property
    def metadata(self):
        return self.scene.GetNodeByID(self.metadata_id)

    def series(self, model: str, statistic: str = "mean"):
        node_id = self.series_ids.get((model, statistic))
        return self.scene.GetNodeByID(node_id) if node_id else None


def show_comparison(comparison, feature: str | None = None, spread: bool = True, scene=None,
                    name: str = "DeepDream comparison") -> ComparisonNodes:
    """Show a ``compare.Comparison`` (several models x restarts) as nodes.

    Tables ``<name> <model>``: ``iteration`` and, for ``probability`` and every feature, the
    statistic over the restarts at each iteration: ``<curve>_mean``, ``_std`` (ddof 0), ``_min``,
    ``_max`` (z-scores when the comparison has reference statistics, raw values otherwise;
    probability raw; NaN where no restart has a value). One chart ``<name>`` of ``feature``
    (default the first feature): per model the mean (solid) and, with ``spread`` and more than one
    restart, min and max (thin dashed, same colour), and the normal band for z-scores. Switch the
    chart to another curve with :func:`show_comparison_feature`.
    """
    scene = _scene(scene)
    curves = ["probability", *comparison.features]
    feature = feature or (comparison.features[0] if comparison.features else "probability")
    if feature not in curves:
        raise FeatureError(f"The comparison has no curve {feature!r}; it has: {', '.join(curves)}.")
    comparison_id = str(time.time_ns())
    tag = {ATTR_COMPARISON: comparison_id}
    iterations = np.asarray(comparison.iterations, dtype=float)
    table_ids: dict[str, str] = {}
    for model in comparison.models:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{name} {model}"))
        node.SetAttribute(ATTR_ROLE, "comparison table")
        node.SetAttribute(ATTR_COMPARISON, comparison_id)
        node.SetAttribute("DeepDreamAnalysis.Model", model)
        was = node.StartModify()
        columns = {"iteration": iterations}
        for curve in curves:
            for stat in COMPARISON_STATS:
                columns[f"{curve}_{stat}"] = np.asarray(getattr(comparison, stat)(model, curve), dtype=float)
        table = node.GetTable()
        for column_name, values in columns.items():
            array = vtk.vtkDoubleArray()
            array.SetName(column_name)
            array.SetNumberOfTuples(len(values))
            numpy_support.vtk_to_numpy(array)[:] = values
            table.AddColumn(array)
        table.Modified()
        node.EndModify(was)
        table_ids[model] = node.GetID()
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(name))
    chart.SetAttribute(ATTR_ROLE, "comparison chart")
    chart.SetAttribute(ATTR_COMPARISON, comparison_id)
    chart.SetXAxisTitle("iteration")
    chart.SetLegendVisibility(True)
    series_tag = {**tag, ATTR_CHART: chart.GetID(), ATTR_ROLE: "comparison series"}
    series_ids: dict[tuple[str, str], str] = {}
    stats = ("mean", "min", "max") if spread and comparison.restarts > 1 else ("mean",)
    for n, model in enumerate(comparison.models):
        for stat in stats:
            label = model if stat == "mean" else f"{model} {stat}"
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{name} {label}"))
            for key, value in series_tag.items():
                series.SetAttribute(key, value)
            series.SetAndObserveTableNodeID(table_ids[model])
            series.SetXColumnName("iteration")
            _style_series(series, PALETTE[n % len(PALETTE)], dashed=stat != "mean", width=2 if stat == "mean" else 1)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
            series_ids[(model, stat)] = series.GetID()
    band_ids: list[str] = []
    if comparison.normalised and len(iterations):
        band = _band_nodes(scene, float(iterations[0]), float(iterations[-1]), name,
                           {**tag, ATTR_CHART: chart.GetID(), ATTR_ROLE: "comparison band"})
        band_ids = [b.GetID() for b in band[1:]]
    metadata = scene.AddNewNodeByClass("vtkMRMLTextNode", scene.GenerateUniqueName(f"{name} metadata"))
    metadata.SetAttribute(ATTR_ROLE, "comparison metadata")
    metadata.SetAttribute(ATTR_COMPARISON, comparison_id)
    meta = dict(comparison.metadata)
    meta.update({"models_order": list(comparison.models), "features": list(comparison.features),
                 "restarts": comparison.restarts})
    metadata.SetText(json.dumps(meta, indent=2, default=_json_default))
    nodes = ComparisonNodes(scene, comparison_id, table_ids, chart.GetID(), metadata.GetID(), series_ids, band_ids,
                            feature, comparison.normalised)
    show_comparison_feature(nodes, feature)
    return nodes


def show_comparison_feature(nodes: ComparisonNodes, feature: str) -> None:
    """Point the comparison chart at another curve (``probability`` or a feature of the comparison)."""
    tables = [t for t in nodes.tables.values() if t is not None]
    if tables and not _has_column(tables[0], f"{feature}_mean"):
        curves = [c[: -len("_mean")] for c in (tables[0].GetTable().GetColumnName(i)
                                                for i in range(tables[0].GetTable().GetNumberOfColumns()))
                  if c.endswith("_mean")]
        raise FeatureError(f"The comparison has no curve {feature!r}; it has: {', '.join(curves)}.")
    chart = nodes.chart
    if chart is None:
        raise DeepDreamError("The comparison chart was deleted; show the comparison again.")
    zmode = nodes.normalised and feature != "probability"
    was = chart.StartModify()
    for (model, stat), node_id in nodes.series_ids.items():
        series = nodes.scene.GetNodeByID(node_id)
        if series is not None:
            series.SetYColumnName(f"{feature}_{stat}")
    for node_id in nodes.band_ids:
        if zmode and not chart.HasPlotSeriesNodeID(node_id):
            chart.AddAndObservePlotSeriesNodeID(node_id)
        elif not zmode and chart.HasPlotSeriesNodeID(node_id):
            chart.RemovePlotSeriesNodeID(node_id)
    chart.SetTitle(f"{feature} ({'z-score' if zmode else 'raw value'}), mean over restarts per model")
    chart.SetYAxisTitle("z-score (normal range: -1 to 1)" if zmode else feature)
    chart.EndModify(was)
    nodes.feature = feature
