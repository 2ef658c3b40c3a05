"""The seeds' recipe, as a baseline beside edgeq's artifacts: PyTorch dynamic int8 of a Hugging Face
encoder's Linear layers (`torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, qint8)`: int8
weights per tensor, activations quantized per call from their own range), run eagerly in PyTorch.

Imported by bench_runner.py (on the build host only, when the spec asks for a torch baseline: it
needs torch and transformers, which a device does not have) and by the benchmark stage, which
measures its size and fidelity. No edgeq import: it is a runner's sibling.
"""
import inspect


def load_dynamic_int8(model_dir: str, task: str, trust_remote_code: bool = False):
    """The model at `model_dir` (AutoModel, or AutoModelForSequenceClassification for
    text-classification), eval mode, its nn.Linear layers quantized to qint8."""
    import warnings

    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    model = cls.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code).eval()
    with warnings.catch_warnings():  # torch 2.13 marks its quantized tensors deprecated; the recipe is the baseline's point
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def forward_fn(model, task: str):
    """feeds (numpy int64 arrays by ONNX input name) -> the output edgeq compares (numpy): the logits
    of a classifier, else last_hidden_state. Inputs the model's forward does not take are left out."""
    import torch

    accepted = set(inspect.signature(model.forward).parameters)

    def run(feeds: dict):
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v) for k, v in feeds.items() if k in accepted})
        return (out.logits if task == "text-classification" else out.last_hidden_state).numpy()

    return run


def state_dict_bytes(model, path: str) -> int:
    """Size of the quantized model as PyTorch saves it (torch.save of the state dict, as the seeds'
    worked example measures it)."""
    import os

    import torch

    torch.save(model.state_dict(), path)
    return os.path.getsize(path)
