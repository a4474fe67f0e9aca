"""FCN models: FCN-32s/16s/8s on a fully convolutional VGG16, and loading their weights."""

from fcnseg.models.fcn import FCN_NAMES, FCN8s, FCN16s, FCN32s, build_fcn
from fcnseg.models.weights import init_from_coarser, load_reference_weights

__all__ = ["FCN_NAMES", "FCN8s", "FCN16s", "FCN32s", "build_fcn", "init_from_coarser", "load_reference_weights"]
