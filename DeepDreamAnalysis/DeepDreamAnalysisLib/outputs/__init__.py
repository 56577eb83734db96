"""Output folders: what the tool may write and delete there (issue #11).

- :mod:`.manifest`: each output folder holds ``deepdream-manifest.json``, the list of files the tool
  wrote there; a rerun replaces or deletes only those, never a file the tool did not write.
- :mod:`.lock`: ``deepdream.lock`` makes a second run into the same folder fail at once; it is also
  the run's staging log (each hidden temporary item logged before it is created).
- :mod:`.leftovers`: what a run killed mid-write left there; the next run removes the logged items
  (only as the tool made them, never through a link) and warns about anything else.
- :mod:`.orphans` (with :mod:`.processes`): leftovers of a killed process outside a locked folder (the
  Slicer panel worker's temporary folder, an atomic write's temporary file), removed once the process
  that made them has ended, only when they carry its record.
- :mod:`.folder`: the checks made before any work starts (an output folder that holds an input or
  lies inside one, a non-empty folder that is not the tool's, a file in the way).
"""

from .folder import OutputFolder, check_output_folder, inputs_inside
from .lock import FolderLock, LOCK_NAME
from .manifest import MANIFEST_NAME, Manifest, ManifestWriter, read_manifest

__all__ = ["OutputFolder", "check_output_folder", "inputs_inside", "FolderLock", "LOCK_NAME", "MANIFEST_NAME",
           "Manifest", "ManifestWriter", "read_manifest"]
