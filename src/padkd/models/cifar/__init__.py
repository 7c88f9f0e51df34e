"""The CIFAR model zoo of the CRD benchmark (Tian et al., ICLR 2020), registered in MODELS."""

from padkd.models.cifar import mobilenet, resnet, shufflenet, vgg, wrn
from padkd.models.cifar.common import ZOO

__all__ = ["ZOO", "mobilenet", "resnet", "shufflenet", "vgg", "wrn"]
