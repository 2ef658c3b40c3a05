"""A small random CNN factory for the image-model tests (importable as tiny_cnn:factory)."""
import torch
from torch import nn


def factory():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 16, 1), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    for m in model.modules():  # batch-norm statistics that are not the identity, as in a trained model
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


factory.edgeq_input_shape = [1, 3, 32, 32]
factory.edgeq_preprocess = {"resize": 36, "crop": 32, "mean": 127.5, "std": 64.0}


def not_a_module():
    return "a string"
