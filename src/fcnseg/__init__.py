"""fcnseg: Fully Convolutional Networks (Long, Shelhamer & Darrell, CVPR 2015) for PASCAL VOC."""

# First of all, so that its atexit handler is the last to run (atexit is last-in, first-out): see the module
from fcnseg import process_exit  # noqa: F401

__version__ = "0.1.0"
