"""fcnseg: Fully Convolutional Networks (Long, Shelhamer & Darrell, CVPR 2015) for PASCAL VOC."""

__version__ = "0.1.0"
