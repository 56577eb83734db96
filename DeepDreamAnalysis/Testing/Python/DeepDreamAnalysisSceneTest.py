"""In-Slicer test of the MRML bridge (DeepDreamAnalysisLib/scene.py) in the application's scene:
output nodes from hand-made results, their geometry, the sequence browser, and the layout calls
the panel makes. (The same bridge is tested headless in CI by Testing/test_scene.py.)"""

import unittest

import numpy as np
import slicer

from DeepDreamAnalysisLib import scene
from DeepDreamAnalysisLib.result import Crop, Progress, Snapshot, Step


class DeepDreamAnalysisSceneTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def test_nodes_from_progress(self):
        array = np.zeros((6, 20, 24), np.float32)
        volumeNode = slicer.util.addVolumeFromArray(array, name="input")
        volumeNode.SetSpacing(0.7, 0.8, 2.0)
        crop = Crop((1, 2, 3), (4, 10, 12))
        updater = scene.SceneUpdater(volumeNode, crop, ["firstorder_Mean"], total_iterations=10,
                                     options=scene.SceneOptions(record_every=2))
        for it in range(10):
            image = np.full(crop.size, float(it), np.float32)
            mask = np.zeros(crop.size, bool)
            mask[1:3, 3:6, 4:8] = True
            snap = Snapshot(it, image, image, mask) if it % 2 == 0 else None
            updater.update([Progress(Step(it, it, 0.1 * it, int(mask.sum()), {"firstorder_Mean": it}), snap, 10, 0, 0)])
        nodes = updater.finish(None, status="completed")
        self.assertEqual(nodes.table.GetNumberOfRows(), 10)
        self.assertEqual(slicer.util.arrayFromVolume(nodes.image).shape, crop.size)
        self.assertEqual(nodes.imageSequence.GetNumberOfDataNodes(), 5)
        nodes.browser.SetSelectedItemNumber(0)
        slicer.app.processEvents()
        self.assertEqual(float(slicer.util.arrayFromVolume(nodes.image).max()), 0.0)
        # What the panel does with the nodes
        slicer.util.setSliceViewerLayers(background=volumeNode, foreground=nodes.image, foregroundOpacity=1.0)
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotView)
        slicer.modules.plots.logic().ShowChartInLayout(nodes.chart)
        slicer.app.processEvents()


def runTest():
    unittest.main(module=__name__, exit=False)


if __name__ == "__main__":
    unittest.main()
