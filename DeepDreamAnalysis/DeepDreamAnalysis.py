"""DeepDreamAnalysis: which image features does a segmentation network react to?

3D Slicer scripted module (Module, ParameterNode, Widget, Logic, Test). The analysis itself lives in
DeepDreamAnalysisLib (the engine); the MRML work in DeepDreamAnalysisLib/scene.py and the run
control in DeepDreamAnalysisLib/slicer_logic.py, which CI tests without Slicer. This file never
imports torch, monai, radiomics or matplotlib at the top: a module that fails to import disappears
from Slicer, and torch comes from the PyTorch extension only when the user presses Apply.
"""

import logging
import os
import sys
from typing import Annotated

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MIN_PYTHON = (3, 10)
"""The engine is tested on Python 3.10 and later: Slicer 5.10 and later. Older Slicers (5.6 and 5.8
ship Python 3.9) get the module with a message instead of the panel."""
PYTHON_OK = sys.version_info[:2] >= MIN_PYTHON
TOO_OLD_MESSAGE = (
    "DeepDream Analysis needs Slicer 5.10 or later (Python {need}); this Slicer runs Python {have}. "
    "Install a current Slicer from download.slicer.org.").format(
        need=".".join(map(str, MIN_PYTHON)), have=".".join(map(str, sys.version_info[:2])))

if PYTHON_OK:
    from DeepDreamAnalysisLib.config import PAPER_FEATURES_2D, PAPER_FEATURES_3D
    from DeepDreamAnalysisLib.slicer_logic import AnalysisLogicCore, features_for_dims, model_card_hints, status_text
else:  # the names the class statements below need; nothing of the engine is imported
    PAPER_FEATURES_2D = PAPER_FEATURES_3D = ()
    AnalysisLogicCore = object

TIMER_INTERVAL_MS = 150


#
# Module
#


class DeepDreamAnalysis(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DeepDream Analysis")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepDreamAnalysis developers"]
        self.parent.helpText = _(
            "Makes a segmentation network 'dream' a lesion at a seed point by gradient ascent on the "
            "image, and tracks radiomic features of the dreamed object, normalised against real "
            "lesions (Couteaux et al., 2019). Features that move quickly into the normal range are "
            "ones the network reacts to. See the "
            '<a href="https://github.com/deepdream-analysis/SlicerDeepDreamAnalysis">documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "Implements V. Couteaux, O. Nempont, G. Pizaine, I. Bloch: 'Towards Interpretability of "
            "Segmentation Networks by Analyzing DeepDreams' (iMIMIC 2019)."
        )
        if not PYTHON_OK:
            logging.error(TOO_OLD_MESSAGE)
            self.parent.helpText = TOO_OLD_MESSAGE


#
# Parameter node
#


@parameterNodeWrapper
class DeepDreamAnalysisParameterNode:
    """The panel's settings, saved with the scene.

    modelPath, referencePath: text ('' when none; a ``pathlib.Path`` parameter would show an empty
    path as '.'), synced with the path pickers by the widget. features: the ticked feature names
    (empty: not chosen yet, the paper's features are ticked).
    """

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    seed: slicer.vtkMRMLMarkupsFiducialNode
    modelPath: str = ""
    referencePath: str = ""
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    iterations: Annotated[int, WithinRange(1, 100000)] = 300
    step: Annotated[float, WithinRange(0.0001, 100000.0)] = 1.0
    recordEvery: Annotated[int, WithinRange(1, 10000)] = 10
    newOutputs: bool = False
    allowCodeTargets: bool = False
    features: list[str]


#
# Widget
#


class DeepDreamAnalysisWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cleanedUp = False
        self._modelDims = None  # the chosen model's spatial_dims (2, 3) from its card; None: not known
        self._hintedModelPath = None  # the model path whose card settings were last applied

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if not PYTHON_OK:
            self.layout.addWidget(qt.QLabel(TOO_OLD_MESSAGE))
            self.logic = None
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepDreamAnalysis.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DeepDreamAnalysisLogic()

        self.ui.seedPlaceWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.seedPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        # only the Place button: hiding the buttons hides it too, so show it again (Slicer's own pattern)
        self.ui.seedPlaceWidget.buttonsVisible = False
        self.ui.seedPlaceWidget.placeButton().show()
        self.ui.modelPathLineEdit.filters = ctkPathFilters()
        self.ui.referencePathLineEdit.nameFilters = ["Reference statistics (*.json)"]
        self._fillFeatureTree()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        slicer.app.connect("aboutToQuit()", self.cleanup)  # disconnected in cleanup

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.seedSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSeedNodeChanged)
        self.ui.featureTree.connect("itemChanged(QTreeWidgetItem*,int)", self.onFeatureItemChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.referencePathLineEdit.connect("currentPathChanged(QString)", self.onReferencePathChanged)
        self.ui.modelFolderButton.connect("clicked()", self.onModelFolderButton)
        self.initializeParameterNode()

    # --- life cycle ---------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Module reload or application exit: end the run's worker process at once (its nodes stay,
        tagged cancelled) without waiting. Runs once, however often it is called."""
        if self._cleanedUp:
            return
        self._cleanedUp = True
        slicer.app.disconnect("aboutToQuit()", self.cleanup)
        if self.logic is not None:
            self.logic.abandon(timeout=0)
        self.removeObservers()

    def onReload(self) -> None:
        """Reload the module and DeepDreamAnalysisLib with it (Slicer reloads only this file)."""
        self.cleanup()
        for name in [n for n in sys.modules if n == "DeepDreamAnalysisLib" or n.startswith("DeepDreamAnalysisLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        if self.logic is not None:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._syncPaths)

    def onSceneStartClose(self, caller, event) -> None:
        # The run handle observes the scene close too and cancels itself (console runs included);
        # here the panel only stops its timer, without waiting for the worker.
        if self.logic is not None and self.logic.isRunning:
            self.logic.abandon(timeout=0)
            self._updateRunState()
            self.ui.statusLabel.text = _("Cancelled: the scene was closed.")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first
        if not self._parameterNode.seed:
            from DeepDreamAnalysisLib.scene import find_or_make_seed_node

            self._parameterNode.seed = find_or_make_seed_node()  # the module's list if there is one

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._syncPaths)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # a path restored with the scene keeps the scene's iterations and step (no card override)
            self._hintedModelPath = str(self._parameterNode.modelPath)
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._syncPaths)
            self._syncPaths()
            self.onSeedNodeChanged(self._parameterNode.seed)
            self._checkFeatureItems(self._parameterNode.features)
            self._checkCanApply()

    # --- GUI ----------------------------------------------------------------------------------

    def _fillFeatureTree(self) -> None:
        """The checkable feature list, grouped by pyradiomics class; the paper's features ticked.
        One shape group shows: the model's (``shape`` for 3D, ``shape2D`` for 2D) once its card is
        known, both before that (the logic then translates to the model's dimensionality)."""
        from DeepDreamAnalysisLib.slicer_deps import feature_catalog

        tree = self.ui.featureTree
        tree.clear()
        tree.setHeaderLabels([_("Feature")])
        for group, names in feature_catalog().items():
            parent = qt.QTreeWidgetItem(tree, [group])
            parent.setData(0, qt.Qt.UserRole, names[0].split("_", 1)[0] if names else group)
            parent.setFlags(parent.flags() | qt.Qt.ItemIsAutoTristate | qt.Qt.ItemIsUserCheckable)
            for name in names:
                item = qt.QTreeWidgetItem(parent, [name])
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setData(0, qt.Qt.UserRole, name)
                item.setCheckState(0, qt.Qt.Unchecked)
        self._checkFeatureItems([])

    def _featureItems(self, visibleOnly: bool = False):
        tree = self.ui.featureTree
        for g in range(tree.topLevelItemCount):
            group = tree.topLevelItem(g)
            if visibleOnly and group.isHidden():
                continue
            for c in range(group.childCount()):
                yield group.child(c)

    def _showShapeGroups(self) -> None:
        """Hide the shape group of the other dimensionality once the model's is known."""
        hidden = {3: "shape2D", 2: "shape"}.get(self._modelDims)
        tree = self.ui.featureTree
        for g in range(tree.topLevelItemCount):
            group = tree.topLevelItem(g)
            group.setHidden(group.data(0, qt.Qt.UserRole) == hidden)

    def _checkFeatureItems(self, features) -> None:
        """Tick ``features`` (a list of names; empty: the paper's), in the model's dimensionality."""
        names = [f for f in (features or []) if f]
        if not names:
            names = list(PAPER_FEATURES_2D) + list(PAPER_FEATURES_3D)
        if self._modelDims in (2, 3):
            names = list(features_for_dims(names, self._modelDims)[0])
        names = set(names)
        wasBlocked = self.ui.featureTree.blockSignals(True)
        for item in self._featureItems():
            item.setCheckState(0, qt.Qt.Checked if item.data(0, qt.Qt.UserRole) in names else qt.Qt.Unchecked)
        self.ui.featureTree.blockSignals(wasBlocked)

    def onFeatureItemChanged(self, item, column) -> None:
        if self._parameterNode is None:
            return
        self._saveFeatures()

    def _tickedFeatures(self) -> list:
        """The ticked names of the groups shown (a hidden shape group's ticks are not the user's)."""
        return [i.data(0, qt.Qt.UserRole) for i in self._featureItems(visibleOnly=True)
                if i.checkState(0) == qt.Qt.Checked]

    def _saveFeatures(self) -> None:
        self._parameterNode.features = self._tickedFeatures()

    def onSeedNodeChanged(self, node) -> None:
        """The seed list stays uncapped (a full list makes Slicer start a new one on the next click);
        each placed point replaces the previous one."""
        self.ui.seedPlaceWidget.setCurrentNode(node)
        self.removeObservers(self.onSeedPointPlaced)
        if node is not None:
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onSeedPointPlaced)

    def onSeedPointPlaced(self, caller, event) -> None:
        from DeepDreamAnalysisLib.scene import keep_last_point

        keep_last_point(caller)

    def _syncPaths(self, caller=None, event=None) -> None:
        """Parameter node -> path pickers (the pickers' changes come back through their signals)."""
        p = self._parameterNode
        if p is None:
            return
        for widget, value in ((self.ui.modelPathLineEdit, p.modelPath), (self.ui.referencePathLineEdit, p.referencePath)):
            if widget.currentPath != value:
                widget.currentPath = value

    def onReferencePathChanged(self, path) -> None:
        if self._parameterNode is not None and self._parameterNode.referencePath != path:
            self._parameterNode.referencePath = path

    def onModelFolderButton(self) -> None:
        """Pick a MONAI bundle folder (the path picker's browse button opens a file dialog)."""
        start = os.path.dirname(self._parameterNode.modelPath) if self._parameterNode and self._parameterNode.modelPath else ""
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Choose a MONAI bundle folder"), start)
        if folder:
            self.ui.modelPathLineEdit.currentPath = folder

    def onModelPathChanged(self, path) -> None:
        from DeepDreamAnalysisLib.slicer_deps import model_format_note

        if self._parameterNode is not None and self._parameterNode.modelPath != path:
            self._parameterNode.modelPath = path

        note = model_format_note(path)
        self.ui.modelFormatNoteLabel.text = note
        self.ui.modelFormatNoteLabel.visible = bool(note)
        # The card (read without loading the model): its dimensionality picks the shape group shown,
        # and its recommended dream settings fill in iterations and step when a model is chosen.
        dims, recommended = model_card_hints(path)
        if dims != self._modelDims:
            self._modelDims = dims
            self._showShapeGroups()
            if self._parameterNode is not None:
                self._checkFeatureItems(self._parameterNode.features)
                if self._parameterNode.features:
                    self._saveFeatures()
        p = self._parameterNode
        if p is None or str(path) == self._hintedModelPath:
            return
        self._hintedModelPath = str(path)
        said = []
        if recommended.get("iterations") is not None:
            p.iterations = min(100000, max(1, int(recommended["iterations"])))
            said.append(_("{n} iterations").format(n=p.iterations))
        if recommended.get("step") is not None:
            p.step = min(100000.0, max(0.0001, float(recommended["step"])))
            said.append(_("step {s:g}").format(s=p.step))
        if said:
            self.ui.statusLabel.text = _("Dream settings from the model card: {s}.").format(s=", ".join(said))

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self.logic is not None and self.logic.isRunning:
            return
        p = self._parameterNode
        ready = bool(p and p.inputVolume and p.seed and p.modelPath.strip())
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = _("Run the analysis") if ready else _(
            "Select an input volume, a model and place a seed point")

    def _updateRunState(self) -> None:
        running = self.logic is not None and self.logic.isRunning
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = True
        self.ui.parametersCollapsibleButton.enabled = not running
        self.ui.inputsCollapsibleButton.enabled = not running
        if not running:
            self._checkCanApply()

    # --- run ----------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self.logic.isRunning:
            self.logic.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the analysis."), waitCursor=True):
            from DeepDreamAnalysisLib.slicer_deps import ensure_dependencies

            if not ensure_dependencies(askConfirmation=True):
                return
            p = self._parameterNode
            features = self._tickedFeatures()
            if not features:
                from DeepDreamAnalysisLib.errors import FeatureError

                raise FeatureError(_("No feature is ticked. Tick at least one feature under Features (the "
                                     "paper's seven are ticked by default)."))
            self.ui.progressBar.value = 0
            self.ui.progressBar.maximum = p.iterations
            self.logic.run(
                p.inputVolume, p.modelPath, p.seed, iterations=p.iterations, step=p.step,
                features=features, referencePath=p.referencePath, device=p.device,
                recordEvery=p.recordEvery, newNodes=p.newOutputs, allowCodeTargets=p.allowCodeTargets,
                waitForCompletion=False, progressCallback=self.onProgress, logCallback=self.onLog,
                finishedCallback=self.onFinished)  # a worker process, drained by the logic's one timer
            self._showOutputs()
        self._updateRunState()

    def onProgress(self, progress) -> None:
        self.ui.progressBar.maximum = progress.total_iterations
        self.ui.progressBar.value = progress.step.iteration + 1
        self.ui.statusLabel.text = status_text(progress, self.logic.handle.status)

    def onLog(self, message: str) -> None:
        logging.info(message)
        self.ui.statusLabel.text = message

    def onFinished(self, handle) -> None:
        text = handle.statusText()
        flags = getattr(handle.result, "quality_flags", None) or []
        if flags:
            text += " " + _("Check the dream: {flags}.").format(
                flags="; ".join(getattr(f, "message", str(f)) for f in flags))
        self.ui.statusLabel.text = text
        if handle.error is not None:
            slicer.util.errorDisplay(str(handle.error), windowTitle=_("DeepDream Analysis"))
        self._updateRunState()

    def _showOutputs(self) -> None:
        """Dream image as foreground over the input, mask shown, chart in a layout beside the views."""
        nodes = self.logic.handle.nodes
        slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume, foreground=nodes.image,
                                         foregroundOpacity=1.0, fit=False)
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotView)
        slicer.modules.plots.logic().ShowChartInLayout(nodes.chart)
        mask = nodes.mask
        if mask is not None and mask.GetDisplayNode() is not None:
            mask.GetDisplayNode().SetOpacity2DFill(0.3)


def ctkPathFilters():
    import ctk

    return ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Readable


#
# Logic
#


class DeepDreamAnalysisLogic(ScriptedLoadableModuleLogic, AnalysisLogicCore):
    """Scriptable logic: see docs/scripting.md.

    ``run(volumeNode, modelPath, seed, iterations=..., waitForCompletion=True)`` returns the result;
    with ``waitForCompletion=False`` it returns a handle (``cancel()``, ``nodes``, ``status``) whose
    nodes a main-thread timer updates every 150 ms.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        AnalysisLogicCore.__init__(self)
        self._timer = None
        from DeepDreamAnalysisLib.process_runner import remove_dead_run_folders

        remove_dead_run_folders()  # what a crash of Slicer left mid-run: only the tool's folders, of ended processes

    def getParameterNode(self):
        return DeepDreamAnalysisParameterNode(super().getParameterNode())

    def run(self, volumeNode, modelPath=None, seed=None, **kwargs):
        """See AnalysisLogicCore.run. Blocking runs keep Slicer's GUI painting between drains;
        non-blocking runs go to a worker process (``PythonSlicer``; ``process=False``: a thread of
        Slicer's process, which only runs while Slicer's main thread runs Python) and are drained
        by this logic's timer (``manualDrain=True``: call handle.processEvents() yourself)."""
        waitForCompletion = kwargs.get("waitForCompletion", True)
        if waitForCompletion:
            kwargs.setdefault("idle", slicer.app.processEvents)
        elif kwargs.get("model") is None:
            kwargs.setdefault("process", True)
        from DeepDreamAnalysisLib.slicer_deps import require_torch

        require_torch()
        manualDrain = kwargs.pop("manualDrain", False)
        result = AnalysisLogicCore.run(self, volumeNode, modelPath, seed, **kwargs)
        if not waitForCompletion and not manualDrain:
            self._startTimer()
        return result

    def _startTimer(self) -> None:
        if self._timer is None:
            self._timer = qt.QTimer()
            self._timer.setInterval(TIMER_INTERVAL_MS)
            self._timer.timeout.connect(self._onTimer)
        self._timer.start()

    def _onTimer(self) -> None:
        going = False
        for handle in (self.handle, self._comparison):  # a run and a comparison: one drain path
            if handle is not None and handle.processEvents():
                going = True
        if not going:
            self._timer.stop()

    def compareModels(self, volumeNode, models, seed=None, **kwargs):
        """See AnalysisLogicCore.compareModels. Blocking: keeps Slicer's GUI painting while it
        waits. Non-blocking (``waitForCompletion=False``): a worker process (``PythonSlicer``) for
        model paths, drained by this logic's timer (``manualDrain=True``: call
        handle.processEvents() yourself); returns the handle."""
        waitForCompletion = kwargs.get("waitForCompletion", True)
        if waitForCompletion:
            kwargs.setdefault("idle", slicer.app.processEvents)
        from DeepDreamAnalysisLib.slicer_deps import require_torch

        require_torch()
        manualDrain = kwargs.pop("manualDrain", False)
        result = AnalysisLogicCore.compareModels(self, volumeNode, models, seed, **kwargs)
        if not waitForCompletion and not manualDrain:
            self._startTimer()
        return result

    def abandon(self, timeout: float = 10.0) -> None:
        if self._timer is not None:
            self._timer.stop()
        AnalysisLogicCore.abandon(self, timeout)


#
# Test
#


class DeepDreamAnalysisTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test, CTest): a small volume, a tiny model made here, a few CPU
    iterations through the Logic, and checks of the output nodes."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        import importlib.util

        if not PYTHON_OK:
            self.delayDisplay(f"Skipped: {TOO_OLD_MESSAGE}")
            return
        if importlib.util.find_spec("torch") is None:  # extension build machines, fresh installs
            self.delayDisplay("Skipped: PyTorch is not installed (install the PyTorch extension to run this test).")
            return
        self.setUp()
        self.test_run_through_logic()
        self.setUp()
        self.test_scene_close_cancels_a_run()

    def _smallVolumeAndModel(self):
        """A small CT-like volume node and a tiny TorchScript 3D model with its card."""
        import json
        import tempfile

        import numpy as np
        from DeepDreamAnalysisLib.slicer_deps import require_torch

        torch = require_torch()
        rng = np.random.default_rng(0)
        array = rng.normal(110.0, 15.0, (8, 32, 32)).astype(np.float32)
        volumeNode = slicer.util.addVolumeFromArray(array, name="DeepDreamTestVolume")
        volumeNode.SetSpacing(0.8, 0.8, 2.5)
        folder = tempfile.mkdtemp()
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(),
                                  torch.nn.Conv3d(4, 2, 3, padding=1)).eval()
        modelPath = os.path.join(folder, "tiny.pt")
        torch.jit.save(torch.jit.script(net), modelPath)
        card = {"name": "tiny", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                "activation": "softmax", "target_class": 1,
                "preprocessing": {"type": "window", "min": -100.0, "max": 250.0}, "roi_size": [8, 16, 16]}
        with open(os.path.join(folder, "tiny.pt.card.json"), "w") as f:
            json.dump(card, f)
        return volumeNode, modelPath

    def test_scene_close_cancels_a_run(self):
        """Closing the scene mid-run cancels it; nothing is recreated in the new scene."""
        import time

        self.delayDisplay("Closing the scene while a run goes on")
        volumeNode, modelPath = self._smallVolumeAndModel()
        logic = DeepDreamAnalysisLogic()
        handle = logic.run(volumeNode, modelPath, (16, 16, 4), iterations=100000, step=500.0, device="cpu",
                           features=["firstorder_RootMeanSquared"], waitForCompletion=False)
        end = time.monotonic() + 60
        while handle.lastProgress is None and time.monotonic() < end:
            slicer.app.processEvents()
            time.sleep(0.05)
        slicer.mrmlScene.Clear(0)
        self.assertEqual(handle.status, "cancelled")
        self.assertFalse(logic.isRunning)
        for _ in range(10):  # the logic's timer ticks on: it must not bring nodes back
            slicer.app.processEvents()
            time.sleep(0.05)
        handle.runner.join(10)
        self.assertFalse(handle.runner.is_running)
        self.assertIsNone(slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLPlotChartNode"))
        self.delayDisplay("Test passed")

    def test_run_through_logic(self):
        self.delayDisplay("Building a small volume and a tiny model")
        volumeNode, modelPath = self._smallVolumeAndModel()

        self.delayDisplay("Running 6 iterations on the CPU")
        logic = DeepDreamAnalysisLogic()
        result = logic.run(volumeNode, modelPath, (16, 16, 4), iterations=6, step=500.0, device="cpu",
                           recordEvery=2, features=["firstorder_RootMeanSquared", "firstorder_Entropy"])
        self.assertEqual(result.status, "completed")
        nodes = logic.handle.nodes
        self.assertEqual(nodes.table.GetNumberOfRows(), 6)
        self.assertEqual(slicer.util.arrayFromVolume(nodes.image).shape, (8, 16, 16))
        self.assertIsNotNone(nodes.mask.GetSegmentation().GetSegment("dream"))
        self.assertGreaterEqual(nodes.imageSequence.GetNumberOfDataNodes(), 2)
        self.assertIsNotNone(nodes.browser)
        self.assertEqual(nodes.metadata.GetAttribute("DeepDreamAnalysis.Status"), "completed")
        self.delayDisplay("Test passed")
