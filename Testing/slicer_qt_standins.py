"""Stand-ins that let DeepDreamAnalysis.py's Widget run on real Qt (PyQt5, offscreen) outside Slicer.

THIS IS NOT SLICER. What is real: Qt's widgets and event loop (PyQt5), the module's `.ui` file
loaded by Qt's uic, the MRML scene and nodes (slicer-core), the module file itself and the engine
(the run goes to a real worker process). What is stood in for, with the names, properties and
signals of Slicer 5.10's classes:

- PythonQt's calling style (``label.text = "..."`` sets a Qt property; ``obj.connect("sig(args)",
  slot)``): added to PyQt5's classes for the test's duration;
- the Slicer/CTK widgets of the .ui (``qMRMLWidget``, ``qMRMLNodeComboBox``, ``ctkPathLineEdit``,
  ``ctkCollapsibleButton``, ``qSlicerMarkupsPlaceWidget``): small PyQt5 classes with the same Qt
  properties (a property a class lacks fails the .ui load, as a typo would be silently ignored in
  Slicer) and signals;
- ``slicer.parameterNodeWrapper`` (typed parameters stored in a real vtkMRMLScriptedModuleNode,
  ``connectGui`` binding widgets by their ``SlicerParameterName``), ``ScriptedLoadableModule*``,
  ``slicer.app``, ``slicer.util.loadUI``/``childWidgetVariables``/``tryWithErrorDisplay``/
  ``errorDisplay``, the layout manager and plots logic (recorders).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import types
import typing
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PyQt5 import QtCore, QtWidgets, uic  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parents[1] / "DeepDreamAnalysis"


_APP: list = []


def app() -> QtWidgets.QApplication:
    if not _APP:
        _APP.append(QtWidgets.QApplication.instance() or QtWidgets.QApplication(["test"]))
    return _APP[0]


# --------------------------------------------------------------------------- Slicer/CTK widgets

class _TypedSignal:
    """A signal the .ui connects by its C++ signature (``mrmlSceneChanged(vtkMRMLScene*)``)."""

    def __init__(self, bound):
        self.bound = bound

    def __getitem__(self, signature):
        return self.bound

    def connect(self, slot):
        self.bound.connect(slot)

    def emit(self, *args):
        self.bound.emit(*args)


class qMRMLWidget(QtWidgets.QWidget):
    _mrmlSceneChanged = QtCore.pyqtSignal(object)
    mrmlSceneChanged = property(lambda self: _TypedSignal(self._mrmlSceneChanged))

    def setMRMLScene(self, scene):
        self.scene = scene
        self.mrmlSceneChanged.emit(scene)


class qSlicerWidget(qMRMLWidget):
    pass


class qMRMLNodeComboBox(QtWidgets.QWidget):
    currentNodeChanged = QtCore.pyqtSignal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._node = None
        self._props = {}
        self.scene = None

    def _prop(name, kind, default):  # noqa: N805 - a class-body helper
        return QtCore.pyqtProperty(kind, lambda self: self._props.get(name, default),
                                   lambda self, v: self._props.__setitem__(name, v))

    nodeTypes = _prop("nodeTypes", "QStringList", [])
    showChildNodeTypes = _prop("showChildNodeTypes", bool, True)
    addEnabled = _prop("addEnabled", bool, True)
    removeEnabled = _prop("removeEnabled", bool, True)
    renameEnabled = _prop("renameEnabled", bool, False)
    noneEnabled = _prop("noneEnabled", bool, False)
    baseName = _prop("baseName", str, "")
    del _prop

    def setMRMLScene(self, scene):
        self.scene = scene

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        if node is not self._node:
            self._node = node
            self.currentNodeChanged.emit(node)


class ctkPathLineEdit(QtWidgets.QWidget):
    Files, Dirs, Readable = 0x2, 0x1, 0x100
    currentPathChanged = QtCore.pyqtSignal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._path, self._filters, self._nameFilters, self._settingKey = "", 0, [], ""

    def _get_path(self):
        return self._path

    def _set_path(self, value):
        if value != self._path:
            self._path = value
            self.currentPathChanged.emit(value)

    currentPath = QtCore.pyqtProperty(str, _get_path, _set_path)
    filters = QtCore.pyqtProperty(int, lambda self: self._filters, lambda self, v: setattr(self, "_filters", v))
    nameFilters = QtCore.pyqtProperty("QStringList", lambda self: self._nameFilters,
                                      lambda self, v: setattr(self, "_nameFilters", list(v)))
    settingKey = QtCore.pyqtProperty(str, lambda self: self._settingKey, lambda self, v: setattr(self, "_settingKey", v))


class ctkCollapsibleButton(QtWidgets.QPushButton):
    pass


class qSlicerMarkupsPlaceWidget(qSlicerWidget):
    ForcePlaceSingleMarkup, ForcePlaceMultipleMarkups, HidePlaceMultipleMarkupsOption = 0, 1, 2

    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QtWidgets.QHBoxLayout(self)
        self._place = QtWidgets.QToolButton(self)
        self._delete = QtWidgets.QToolButton(self)
        layout.addWidget(self._place)
        layout.addWidget(self._delete)
        self._node, self._multiple, self._deleteAllVisible = None, 1, True

    def _get_buttons(self):
        return getattr(self, "_buttonsVisible", True)

    def _set_buttons(self, visible):
        self._buttonsVisible = bool(visible)
        self._place.setHidden(not visible)
        self._delete.setHidden(not visible)

    buttonsVisible = QtCore.pyqtProperty(bool, _get_buttons, _set_buttons)
    deleteAllControlPointsOptionVisible = QtCore.pyqtProperty(
        bool, lambda self: self._deleteAllVisible, lambda self, v: setattr(self, "_deleteAllVisible", v))
    placeMultipleMarkups = QtCore.pyqtProperty(int, lambda self: self._multiple,
                                               lambda self, v: setattr(self, "_multiple", v))

    def placeButton(self):
        return self._place

    def setCurrentNode(self, node):
        self._node = node

    def currentNode(self):
        return self._node


STANDIN_WIDGETS = [qMRMLWidget, qSlicerWidget, qMRMLNodeComboBox, ctkPathLineEdit, ctkCollapsibleButton,
                   qSlicerMarkupsPlaceWidget]

for _cls in STANDIN_WIDGETS:  # uic sets a property through its setter, as Qt's C++ classes have them
    for _name, _attr in list(vars(_cls).items()):
        if isinstance(_attr, QtCore.pyqtProperty):
            setattr(_cls, "set" + _name[0].upper() + _name[1:], lambda self, v, n=_name: setattr(self, n, v))


# --------------------------------------------------------------------------- PythonQt's style

PYTHONQT_PROPERTIES = {
    QtWidgets.QWidget: ("visible", "enabled", "toolTip"),
    QtWidgets.QLabel: ("text",),
    QtWidgets.QAbstractButton: ("text",),
    QtWidgets.QProgressBar: ("value", "maximum"),
    QtWidgets.QTreeWidget: ("topLevelItemCount",),
}


def pythonqt_style(monkeypatch) -> None:
    """PyQt5 objects answer as PythonQt's do (for the test's duration)."""
    for cls, names in PYTHONQT_PROPERTIES.items():
        for name in names:
            monkeypatch.setattr(cls, name, property(lambda self, n=name: self.property(n),
                                                    lambda self, v, n=name: self.setProperty(n, v)), raising=False)

    def connect(self, signature, slot):
        getattr(self, signature.split("(", 1)[0]).connect(slot)

    monkeypatch.setattr(QtCore.QObject, "connect", connect, raising=False)


# --------------------------------------------------------------------------- parameterNodeWrapper

class Choice:
    def __init__(self, choices):
        self.choices = list(choices)


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


def _base(annotation):
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0], typing.get_args(annotation)[1:]
    return annotation, ()


def parameterNodeWrapper(cls):
    """Typed parameters stored in a real vtkMRMLScriptedModuleNode (see the module docstring)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: getattr(cls, name, None) for name in hints}

    class Wrapper:
        __annotations__ = hints

        def __init__(self, node):
            object.__setattr__(self, "parameterNode", node)
            object.__setattr__(self, "_guis", {})
            for name, default in defaults.items():
                if not node.GetParameter(name) and not node.GetNodeReferenceID(name) and default is not None:
                    setattr(self, name, default)

        def __getattr__(self, name):
            if name not in hints:
                raise AttributeError(name)
            base, _ = _base(hints[name])
            node = self.parameterNode
            if isinstance(base, type) and base.__name__.startswith("vtkMRML"):
                return node.GetNodeReference(name)
            text = node.GetParameter(name)
            if base is list or typing.get_origin(base) is list:
                return json.loads(text) if text else []
            if base is bool:
                return text == "true"
            if base in (int, float):
                return base(text) if text else base(defaults[name] or 0)
            return text

        def __setattr__(self, name, value):
            base, _ = _base(hints[name])
            node = self.parameterNode
            if isinstance(base, type) and base.__name__.startswith("vtkMRML"):
                node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            elif base is list or typing.get_origin(base) is list:
                node.SetParameter(name, json.dumps(list(value)))
            elif base is bool:
                node.SetParameter(name, "true" if value else "false")
            else:
                node.SetParameter(name, str(value))

        def AddObserver(self, event, callback, priority=0.0):
            return self.parameterNode.AddObserver(event, callback, priority)

        def RemoveObserver(self, tag):
            self.parameterNode.RemoveObserver(tag)

        def __bool__(self):
            return True

        def connectGui(self, ui):
            bindings = []
            for widget in vars(ui).values():
                name = widget.property("SlicerParameterName") if isinstance(widget, QtCore.QObject) else None
                if name:
                    bindings.append(_bind(self, widget, str(name)))
            tag = self.parameterNode.AddObserver("ModifiedEvent", lambda *a: [b.write() for b in bindings])
            for b in bindings:
                b.write()
            self._guis[tag] = bindings
            return tag

        def disconnectGui(self, tag):
            for b in self._guis.pop(tag, []):
                b.disconnect()
            if tag is not None:
                self.parameterNode.RemoveObserver(tag)

    Wrapper.__name__ = cls.__name__
    return Wrapper


class _Binding:
    def __init__(self, wrapper, widget, name, read, write, signal):
        self.wrapper, self.widget, self.name = wrapper, widget, name
        self._read, self._write, self.signal = read, write, signal
        signal.connect(self.changed)

    def changed(self, *args):
        value = self._read()
        if getattr(self.wrapper, self.name) != value:
            setattr(self.wrapper, self.name, value)

    def write(self):
        blocked = self.widget.blockSignals(True)
        self._write(getattr(self.wrapper, self.name))
        self.widget.blockSignals(blocked)

    def disconnect(self):
        self.signal.disconnect(self.changed)


def _bind(wrapper, widget, name) -> _Binding:
    base, annotations = _base(wrapper.__annotations__[name])
    for a in annotations:
        if isinstance(a, Choice) and isinstance(widget, QtWidgets.QComboBox):
            widget.clear()
            widget.addItems(a.choices)
        if isinstance(a, WithinRange) and isinstance(widget, (QtWidgets.QSpinBox, QtWidgets.QDoubleSpinBox)):
            widget.setRange(a.minimum, a.maximum)
    if isinstance(widget, qMRMLNodeComboBox):
        return _Binding(wrapper, widget, name, widget.currentNode, widget.setCurrentNode, widget.currentNodeChanged)
    if isinstance(widget, (QtWidgets.QSpinBox, QtWidgets.QDoubleSpinBox)):
        return _Binding(wrapper, widget, name, widget.value, widget.setValue, widget.valueChanged)
    if isinstance(widget, QtWidgets.QComboBox):
        return _Binding(wrapper, widget, name, widget.currentText, widget.setCurrentText, widget.currentTextChanged)
    if isinstance(widget, QtWidgets.QCheckBox):
        return _Binding(wrapper, widget, name, widget.isChecked, widget.setChecked, widget.toggled)
    raise TypeError(f"no stand-in connector binds a {type(widget).__name__} to {name!r} ({base})")


# --------------------------------------------------------------------------- Scripted module bases

class _ModuleParent:
    isEntered = True


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent or _ModuleParent()
        self.reloaded = 0

    def setup(self):
        self.container = QtWidgets.QWidget()
        self.layout = QtWidgets.QVBoxLayout(self.container)

    def resourcePath(self, relative):
        return str(MODULE_DIR / "Resources" / relative)

    def onReload(self):
        self.reloaded += 1


class ScriptedLoadableModuleLogic:
    def getParameterNode(self):
        import slicer

        scene = slicer.mrmlScene
        node = scene.GetSingletonNode("DeepDreamAnalysis", "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
            node.SetSingletonTag("DeepDreamAnalysis")
            node.SetName("DeepDreamAnalysis")
        return node


class ScriptedLoadableModuleTest:
    def delayDisplay(self, message, msec=0):
        print(message)


# --------------------------------------------------------------------------- slicer.app, slicer.util

class _Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *a, **k: self.calls.append((name, a))


class App:
    def __init__(self):
        self.connections: list = []
        self.layout = _Recorder()

    def connect(self, signal, slot):
        self.connections.append((signal, slot))

    def disconnect(self, signal, slot):
        self.connections.remove((signal, slot))

    def processEvents(self):
        app().processEvents()

    def layoutManager(self):
        return self.layout


def install(monkeypatch, slicer):
    """Put the stand-ins in place (undone by ``monkeypatch``); returns (app, error messages)."""
    app()
    pythonqt_style(monkeypatch)
    for cls in STANDIN_WIDGETS:  # where uic looks for a custom widget: the module named by its header
        module = types.ModuleType(cls.__name__)
        setattr(module, cls.__name__, cls)
        monkeypatch.setitem(sys.modules, cls.__name__, module)
    qt = types.ModuleType("qt")
    for name in ("QTimer",):
        setattr(qt, name, getattr(QtCore, name))
    qt.Qt = QtCore.Qt
    for name in ("QTreeWidgetItem", "QLabel", "QFileDialog", "QWidget"):
        setattr(qt, name, getattr(QtWidgets, name))
    monkeypatch.setitem(sys.modules, "qt", qt)
    ctk = types.ModuleType("ctk")
    ctk.ctkPathLineEdit = ctkPathLineEdit
    monkeypatch.setitem(sys.modules, "ctk", ctk)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    monkeypatch.setitem(sys.modules, "slicer.i18n", i18n)
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.Choice, pnw.WithinRange, pnw.parameterNodeWrapper = Choice, WithinRange, parameterNodeWrapper
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", pnw)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for c in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
              ScriptedLoadableModuleTest):
        setattr(slm, c.__name__, c)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    the_app = App()
    errors: list[str] = []
    monkeypatch.setattr(slicer, "app", the_app, raising=False)
    monkeypatch.setattr(slicer, "qSlicerMarkupsPlaceWidget", qSlicerMarkupsPlaceWidget, raising=False)
    plots = _Recorder()
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(plots=types.SimpleNamespace(logic=lambda: plots)),
                        raising=False)

    def loadUI(path):
        return uic.loadUi(path)

    def childWidgetVariables(widget):
        return types.SimpleNamespace(**{w.objectName(): w for w in widget.findChildren(QtCore.QObject)
                                        if w.objectName()})

    @contextlib.contextmanager
    def tryWithErrorDisplay(message="", waitCursor=False):
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - shown, as Slicer's dialog would
            errors.append(f"{message} {exc}")

    monkeypatch.setattr(slicer.util, "loadUI", loadUI)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", childWidgetVariables)
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", tryWithErrorDisplay)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **k: errors.append(str(text)), raising=False)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **k: None, raising=False)
    return the_app, errors


def load_module():
    """Import DeepDreamAnalysis.py afresh (after :func:`install`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("DeepDreamAnalysis_under_test", MODULE_DIR / "DeepDreamAnalysis.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
