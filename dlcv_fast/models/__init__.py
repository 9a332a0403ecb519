"""Reference architectures built from dlcv_fast layers.

Those that torchvision also has take torchvision's constructor arguments and have its
``state_dict`` keys and shapes, so ``model.load_state_dict(tv_model.state_dict())`` works
and the outputs match torchvision's. One module per family (lenet.py, alexnet.py,
vgg.py, resnet.py, googlenet.py, vit.py); a family's builders are listed in :data:`MODELS`.
``vit_tiny`` (DeiT-Tiny widths, 32x32 inputs) has no torchvision builder: it is
torchvision's ``VisionTransformer`` with those hyper-parameters.

``unet`` (segmentation) and ``diffusion_unet`` (the DDPM denoiser, ``model(x, timesteps)``)
have no torchvision counterpart (unet.py, diffusion_unet.py).
"""

from dlcv_fast.models.alexnet import AlexNet, alexnet
from dlcv_fast.models.lenet import LeNet5, lenet5
from dlcv_fast.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from dlcv_fast.models.vgg import (VGG, vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19,
                                  vgg19_bn)
from dlcv_fast.models.googlenet import GoogLeNet, googlenet
from dlcv_fast.models.vit import VisionTransformer, vit_b_16, vit_b_32, vit_l_16, vit_tiny
from dlcv_fast.models.unet import UNet, unet
from dlcv_fast.models.diffusion_unet import DiffusionUNet, diffusion_unet

# name -> builder, for the command line (profile) and the tests.
MODELS = {
    "lenet5": lenet5,
    "alexnet": alexnet,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "vgg11_bn": vgg11_bn,
    "vgg13_bn": vgg13_bn,
    "vgg16_bn": vgg16_bn,
    "vgg19_bn": vgg19_bn,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "googlenet": googlenet,
    "vit_b_16": vit_b_16,
    "vit_b_32": vit_b_32,
    "vit_l_16": vit_l_16,
    "vit_tiny": vit_tiny,
}

__all__ = ["MODELS", "AlexNet", "LeNet5", "ResNet", "VGG", "alexnet", "lenet5", "resnet18",
           "resnet34", "resnet50", "resnet101", "resnet152", "vgg11", "vgg11_bn", "vgg13",
           "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]
__all__ += ["GoogLeNet", "VisionTransformer", "googlenet", "vit_b_16", "vit_b_32", "vit_l_16",
            "vit_tiny"]
__all__ += ["DiffusionUNet", "UNet", "diffusion_unet", "unet"]

# UNets (no torchvision counterpart): segmentation, and the DDPM denoiser (model(x, t)).
MODELS["unet"] = unet
MODELS["diffusion_unet"] = diffusion_unet
