"""Building blocks the FER papers share (ResNet-18 trunk, SE block, ...). Each exists once."""
from .resnet import (RESNET18_TRUNK_PARAMS, drop_source_classifier, resnet18_trunk, torchvision_resnet_to_trunk,
                     trunk_checkpoint_filter)
from .se import SEBlock
from .lanet import LANet, MultiLANet

__all__ = ["resnet18_trunk", "drop_source_classifier", "torchvision_resnet_to_trunk", "trunk_checkpoint_filter",
           "RESNET18_TRUNK_PARAMS", "SEBlock",
           "LANet", "MultiLANet"]
