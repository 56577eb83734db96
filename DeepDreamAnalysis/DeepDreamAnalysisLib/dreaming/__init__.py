"""How to dream: the update methods of the gradient-ascent loop, one small module per idea.

- :mod:`.paper`: the paper's update, unchanged (the reproduction);
- :mod:`.step`: the step in image units and its default from the card's intensity window;
- :mod:`.transforms`: transformation robustness (K copies in one batched forward);
- :mod:`.spectral`: 1/f^d preconditioning with frequencies in cycles/mm;
- :mod:`.accentuate`: soft ball around the seed + L2 penalty to the start image;
- :mod:`.adam`: the Adam optimiser;
- :mod:`.lesion_spectrum`: the reference lesions' amplitude spectrum (numpy; stored with the reference);
- :mod:`.phase`: lesion-spectrum dreaming, only the phase of that spectrum optimised (MACO);
- :mod:`.redirect`: gradients redirected through ReLU layers that are all off (every method but paper);
- :mod:`.window`: the exact seed window the transformed copies are evaluated on (or full-crop copies);
- :mod:`.convolutions`: the CPU convolution kernels for small batches (native rather than oneDNN);
- :mod:`.registry`: names, descriptions, sources, options (:func:`list_methods`);
- :mod:`.method`: one method assembled for one crop (used by the engine's ``DreamLoop``).

docs/dream-methods.md describes each and how the default was chosen.
"""

from .registry import COMPONENTS, DEFAULT_METHOD, MethodInfo, list_methods, parse_method, resolve_options
from .step import default_step, intensity_scale



def __getattr__(name):  # DreamMethod needs torch: imported on first use, so config stays light
    if name == "DreamMethod":
        from .method import DreamMethod

        return DreamMethod
    raise AttributeError(name)


__all__ = ["COMPONENTS", "DEFAULT_METHOD", "DreamMethod", "MethodInfo", "default_step", "intensity_scale",
           "list_methods", "parse_method", "resolve_options"]
