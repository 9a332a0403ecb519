"""Reference architectures built from dlcv_fast layers.

Those that torchvision also has take torchvision's constructor arguments and have its
``state_dict`` keys and shapes, so ``model.load_state_dict(tv_model.state_dict())`` works
and the outputs match torchvision's. One module per family (lenet.py, alexnet.py,
vgg.py); a family's builders are listed in :data:`MODELS`.

Still to come, in the same style, once their layers exist in ``dlcv_fast.nn``:
``vgg11_bn``..``vgg19_bn`` and ``resnet18``..``resnet152`` (BatchNorm2d),
``googlenet`` (BatchNorm2d), ``unet`` (BatchNorm2d), ``vit_b_16``/``vit_b_32``/
``vit_l_16``/``vit_tiny`` (MultiheadAttention) and ``diffusion_unet`` (attention).
Until then, :func:`dlcv_fast.convert` runs torchvision's versions of these on
dlcv_fast's convolution and pooling.
"""

from dlcv_fast.models.alexnet import AlexNet, alexnet
from dlcv_fast.models.lenet import LeNet5, lenet5
from dlcv_fast.models.vgg import VGG, vgg11, vgg13, vgg16, vgg19

# name -> builder, for the command line (profile) and the tests.
MODELS = {
    "lenet5": lenet5,
    "alexnet": alexnet,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
}

__all__ = ["MODELS", "AlexNet", "LeNet5", "VGG", "alexnet", "lenet5", "vgg11", "vgg13", "vgg16",
           "vgg19"]
