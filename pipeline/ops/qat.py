"""Quantization-aware fine-tuning of a Hugging Face model against the target's static int8 recipe.

The PyTorch model gets fake quantization exactly where the static artifact quantizes and with its
types (`emulate`): every nn.Linear whose weight becomes a quantized ONNX MatMul/Attention weight is
replaced by a `FakeQuantLinear` that

- divides its input by the SmoothQuant scales the quantize stage will use (ops/smooth.py),
- quantizes that input per tensor to uint8 -- from the calibrated range for a node the recipe
  quantizes statically, from the tensor's own range for one ONNX Runtime quantizes dynamically
  (the fused Attention, the nodes kept out of static int8),
- quantizes the (smoothed) weight per output channel, symmetric, 7 bits under reduce_range,
- and, for a static node, quantizes the product before the bias from its calibrated range, as the
  QDQ graph does;

each with ONNX Runtime's own formulas (onnxruntime.quantization.quant_utils: the range always
holds 0, scale = (max - min) / 255, zero point rounded; weights absmax / qmax), so the fine-tuned
model computes what the artifact will, and gradients pass the rounding straight through
(torch.fake_quantize_*). `distill` then fine-tunes the Linear weights and biases against the fp32
model's own outputs on the calibration data (no labels), and `write_back` puts the tuned values into
the fp32 ONNX graph, whose static quantization (the unchanged recipe, with the same calibrated
ranges) is the int8-qat artifact: the same graph, fusions and kernels as int8-static.

Why by hand: torch.ao's QAT (prepare_qat / FX) inserts its own observers and learns its own scales,
for PyTorch's backends; what has to match here is ONNX Runtime's static recipe, node by node, on a
graph ORT's transformer optimizer fused. Why not torch.onnx.export of the fake-quantized model: the
QDQ graph it writes has no fused Attention (ORT's fusions do not match through Q/DQ pairs) and
measured no faster than fp32 (README, "Quantization-aware fine-tuning").
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass
class Site:
    """Where one nn.Linear lives in the ONNX graph and how the artifact quantizes it."""
    linear: str  # module name in the PyTorch model
    node: str  # the ONNX node that computes it (a MatMul, or the fused Attention holding q/k/v)
    weight: str  # the node's weight initializer
    chunk: tuple[int, int]  # columns of that initializer that are this Linear's (all, unless packed)
    bias: str | None  # the bias initializer (None when not found)
    bias_chunk: tuple[int, int] | None
    static: bool  # the recipe quantizes the node statically (else ORT quantizes it dynamically)
    act_tensor: str | None = None  # ORT's calibration name of the (smoothed) input, static only
    act_range: tuple[float, float] | None = None  # its calibrated range
    out_tensor: str | None = None  # the product before the bias, static only
    out_range: tuple[float, float] | None = None
    absmax: np.ndarray | None = None  # the input's per-channel max |x| when SmoothQuant smooths the node
    alpha: float | None = None


def _key(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def link(model, torch_model) -> dict[str, tuple]:
    """{Linear module name: (node, weight init, column chunk, bias init, bias chunk)} for every
    nn.Linear whose transposed weight is a MatMul's or a fused Attention's weight initializer in the
    ONNX `model`, found by value (the export and ORT's fusions copy weights bit for bit; Attention
    packs q, k and v side by side). Names are not used: the exporter renames MatMul weights."""
    import torch
    from onnx import numpy_helper

    weights, biases = {}, {}
    for name, m in torch_model.named_modules():
        if isinstance(m, torch.nn.Linear):
            weights.setdefault(_key(m.weight.detach().numpy().T), []).append(name)
            if m.bias is not None:
                biases.setdefault(_key(m.bias.detach().numpy()), []).append(name)
    inits = {i.name: i for i in model.graph.initializer}
    found: dict[str, tuple] = {}
    # plain biases (an Add, BiasGelu or Sum reads them): by the parameter's name, which the exporter
    # keeps for them, else by a value that one initializer and one Linear alone have (biases that
    # start at zero are all equal, and equal to a LayerNorm's bias)
    by_value: dict[str, list[str]] = {}
    for i in model.graph.initializer:
        if len(i.dims) == 1:
            by_value.setdefault(_key(numpy_helper.to_array(i)), []).append(i.name)
    bias_at: dict[str, tuple] = {}
    for key, names in biases.items():
        for name in names:
            if f"{name}.bias" in inits and len(inits[f"{name}.bias"].dims) == 1:
                bias_at[name] = (f"{name}.bias", (0, int(inits[f"{name}.bias"].dims[0])))
            elif len(names) == 1 and len(by_value.get(key, [])) == 1:
                i = inits[by_value[key][0]]
                bias_at[name] = (i.name, (0, int(i.dims[0])))
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Attention") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if w.ndim != 2:
            continue
        parts = 3 if n.op_type == "Attention" else 1
        width = w.shape[1] // parts
        b = (numpy_helper.to_array(inits[n.input[2]]) if n.op_type == "Attention" and len(n.input) > 2
             and n.input[2] in inits else None)
        for p in range(parts):
            cols = (p * width, (p + 1) * width)
            names = weights.get(_key(w[:, cols[0]:cols[1]]), [])
            for name in names if len(names) == 1 else ():  # equal weights: which is which is unknown
                bias = (n.input[2], cols) if b is not None else bias_at.get(name, (None, None))
                found[name] = (n.name, n.input[1], cols, *bias)
    return found


def plan(model, torch_model, static_nodes: set[str], ranges: dict[str, tuple[float, float]],
         absmax: dict[str, np.ndarray] | None, static_alpha: float | None, dynamic_alpha: float | None,
         smoothed_static: set[str], dynamic_nodes: set[str]) -> list[Site]:
    """The Sites of `torch_model` in `model` (the fp32 ONNX graph): which nodes are static, their
    calibrated ranges (ORT's calibration tensor names: `<node>_smoothed_input` or the node's input,
    and its output) and the per-channel |max| SmoothQuant's scales are made from."""
    from edgeq.pipeline.ops import smooth

    nodes = {n.name: n for n in model.graph.node}
    sites = []
    for linear, (node, weight, cols, bias, bcols) in link(model, torch_model).items():
        static = node in static_nodes
        if not static and node not in dynamic_nodes:
            continue  # the artifact leaves it float
        n = nodes[node]
        a = None
        alpha = static_alpha if static else dynamic_alpha
        if absmax is not None and alpha and node in absmax and (not static or node in smoothed_static):
            a = absmax[node]
        site = Site(linear, node, weight, cols, bias, bcols, static, absmax=a, alpha=alpha if a is not None else None)
        if static:
            site.act_tensor = smooth.smoothed_input(node) if a is not None else n.input[0]
            site.act_range = ranges.get(site.act_tensor)
            if site.act_range is None:
                continue  # ORT's quantizer would skip it too (no range)
            if n.output[0] in ranges:
                site.out_tensor, site.out_range = n.output[0], ranges[n.output[0]]
        sites.append(site)
    return sites


def _uint8(lo: float, hi: float) -> tuple[float, int]:
    """ONNX Runtime's asymmetric uint8 scale and zero point for a range (quant_utils.compute_scale_zp)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    return scale, int(min(max(round(-lo / scale), 0), 255))


def fake_quant_linear(qmax: int):
    """The FakeQuantLinear module class (torch imported lazily)."""
    import torch
    import torch.nn.functional as F

    def fq(x, scale, zp):
        """uint8 fake quantization with straight-through rounding: the gradient reaches `scale` too
        (LSQ, Esser et al. 2020), so a static range is learnt rather than kept at its min/max."""
        v = x / scale + zp
        v = torch.clamp(v + (torch.round(v) - v).detach(), 0, 255)
        return (v - zp) * scale

    class FakeQuantLinear(torch.nn.Module):
        def __init__(self, lin, site: Site):
            super().__init__()
            self.weight, self.bias = lin.weight, lin.bias
            self.site = site
            self.register_buffer("absmax", torch.tensor(site.absmax, dtype=torch.float32)
                                 if site.absmax is not None else None)
            self.alpha = site.alpha
            self.peers = [lin.weight]  # the weights sharing this node's input (emulate sets them)
            self.act_zp = self.out_zp = None
            if site.act_range:
                scale, self.act_zp = _uint8(*site.act_range)
                self.act_log_scale = torch.nn.Parameter(torch.tensor(float(np.log(scale))))
            if site.out_range:
                scale, self.out_zp = _uint8(*site.out_range)
                self.out_log_scale = torch.nn.Parameter(torch.tensor(float(np.log(scale))))

        def smooth_scales(self):
            """ops/smooth.scales from the current weight: the quantize stage recomputes them so
            from the tuned weights, so the fine-tuning sees the scales the artifact will have."""
            # a fused Attention's q, k and v share one input, so one s from their largest |W| rows
            w = torch.stack([p.detach().abs().amax(0) for p in self.peers]).amax(0)
            ok = (self.absmax > 0) & (w > 0)
            s = torch.where(ok, self.absmax.clamp(min=1e-30) ** self.alpha / w.clamp(min=1e-30) ** (1 - self.alpha),
                            torch.ones_like(w))
            return s.clamp(1e-4, 1e4)

        def forward(self, x):
            w = self.weight
            if self.absmax is not None:
                s = self.smooth_scales()
                x, w = x / s, w * s
            if self.act_zp is not None:
                x = fq(x, self.act_log_scale.exp(), self.act_zp)
            else:  # DynamicQuantizeLinear: this tensor's own range, holding 0
                scale, zp = _uint8(float(x.detach().min()), float(x.detach().max()))
                x = torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)
            ws = (w.detach().abs().amax(1) / qmax).clamp(min=1e-12)
            w = torch.fake_quantize_per_channel_affine(w, ws, torch.zeros_like(ws, dtype=torch.int32), 0, -128, 127)
            y = F.linear(x, w)
            if self.out_zp is not None:
                y = fq(y, self.out_log_scale.exp(), self.out_zp)
            return y + self.bias if self.bias is not None else y

        def ranges(self) -> dict[str, tuple[float, float]]:
            """The learnt static ranges, by ORT calibration tensor name, as (min, max) that give back
            exactly this scale and zero point."""
            out = {}
            for tensor, log_scale, zp in ((self.site.act_tensor, getattr(self, "act_log_scale", None), self.act_zp),
                                          (self.site.out_tensor, getattr(self, "out_log_scale", None), self.out_zp)):
                if tensor and log_scale is not None:
                    scale = float(log_scale.detach().exp())
                    out[tensor] = (-zp * scale, (255 - zp) * scale)
            return out

    return FakeQuantLinear


def emulate(torch_model, sites: list[Site], reduce_range: bool):
    """`torch_model` with each Site's nn.Linear replaced by its FakeQuantLinear, in place."""
    cls = fake_quant_linear(64 if reduce_range else 127)
    made = []
    for site in sites:
        parent_name, _, leaf = site.linear.rpartition(".")
        parent = torch_model.get_submodule(parent_name) if parent_name else torch_model
        made.append(cls(getattr(parent, leaf), site))
        setattr(parent, leaf, made[-1])
    for m in made:
        m.peers = [o.weight for o in made if o.site.node == m.site.node]
    return torch_model


def quantize_tables(model, torch_model, nodes: set[str]) -> list[str]:
    """The constant tables ORT's dynamic int8 quantizes in the dynamic `nodes` (QEmbedLayerNormalization:
    the word, position and segment embeddings and the LayerNorm's weight and bias, uint8 per tensor)
    rounded in place in `torch_model` as ORT rounds them: they are not trained, so rounding once is
    their exact emulation. Matched by name (the exporter keeps parameter names for them). Returns
    the parameters rounded."""
    import torch

    params = dict(torch_model.named_parameters())
    done = []
    for n in model.graph.node:
        if n.op_type != "EmbedLayerNormalization" or n.name not in nodes:
            continue
        for name in n.input:
            p = params.get(name)
            if p is None:
                continue
            with torch.no_grad():
                scale, zp = _uint8(float(p.min()), float(p.max()))
                p.copy_(torch.fake_quantize_per_tensor_affine(p, scale, zp, 0, 255))
            done.append(name)
    return done


def learnt_ranges(torch_model) -> dict[str, tuple[float, float]]:
    """Every FakeQuantLinear's learnt static ranges, by ORT calibration tensor name."""
    out = {}
    for m in torch_model.modules():
        if hasattr(m, "ranges") and hasattr(m, "site"):
            out.update(m.ranges())
    return out


def write_back(model, torch_model, sites: list[Site]) -> int:
    """The tuned weights and biases of `torch_model` into the fp32 ONNX `model`, in place (transposed,
    into their columns of packed initializers). Returns the number of initializers changed."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    arrays: dict[str, np.ndarray] = {}
    for site in sites:
        m = torch_model.get_submodule(site.linear)
        w = arrays.setdefault(site.weight, numpy_helper.to_array(inits[site.weight]).copy())
        w[:, site.chunk[0]:site.chunk[1]] = m.weight.detach().numpy().T
        if site.bias and m.bias is not None:
            b = arrays.setdefault(site.bias, numpy_helper.to_array(inits[site.bias]).copy())
            b[site.bias_chunk[0]:site.bias_chunk[1]] = m.bias.detach().numpy()
    for name, a in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(a.astype(np.float32), name))
    return len(arrays)


HOW = ("distillation fine-tuning of the Hugging Face model with the static recipe's fake quantization "
       "(uint8 per-tensor activations: learnt static ranges (LSQ) or dynamic; SmoothQuant scales from the current "
       "weights; per-channel symmetric int8 weights), loss on the fp32 model's own outputs for the calibration data; "
       "then the target's static recipe on the tuned fp32 graph with the learnt ranges (edgeq.pipeline.ops.qat)")


def _loss(student_out, teacher_out, mask):
    """Distillation loss on the output the evaluation compares: squared error relative to the
    teacher's mean square (per token, over real tokens) plus 10 x (1 - cosine) of the mean-pooled
    output (the embedding edgeq's fidelity scores; a classifier's logits as they are)."""
    import torch.nn.functional as F

    t, s = teacher_out, student_out
    if t.dim() == 3 and mask is not None:
        m = mask.unsqueeze(-1).to(t.dtype)
        err = ((s - t) ** 2 * m).sum() / (m.sum() * t.pow(2).mean())
        s, t = (s * m).sum(1) / m.sum(1), (t * m).sum(1) / m.sum(1)
    else:
        err = ((s - t) ** 2).mean() / t.pow(2).mean() * t.shape[-1]
        s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
    return err + 10 * (1 - F.cosine_similarity(s, t, dim=-1)).mean()


def fine_tune(model_dir, task: str, model, static_nodes: set[str], dynamic_nodes: set[str], ranges: dict,
              absmax: dict | None, static_alpha: float | None, dynamic_alpha: float | None,
              smoothed_static: set[str], reduce_range: bool, config, data, track, trust_remote_code: bool = False) -> dict:
    """--mode qat: fine-tunes the Hugging Face model at `model_dir` under the static artifact's fake
    quantization (`plan`, `emulate`) by distillation against itself in fp32, on `data`'s calibration
    samples; writes the tuned weights into the fp32 ONNX `model` in place. Returns the learnt ranges
    (by ORT calibration tensor name) and counts. Deterministic for a seed on one machine: fixed data
    order, no dropout (both models in eval mode: the gradients do not need train mode)."""
    import copy
    import inspect

    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    from edgeq.core import EdgeqError

    torch.manual_seed(config.seed)
    cls = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    try:
        teacher = cls.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code).eval()
    except Exception as e:  # a directory ORT's export read but transformers' class cannot load as such
        raise EdgeqError(f"qat: transformers cannot load {model_dir} as {cls.__name__}: "
                         f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}") from None
    for p in teacher.parameters():
        p.requires_grad_(False)
    sites = plan(model, teacher, static_nodes, ranges, absmax, static_alpha, dynamic_alpha, smoothed_static,
                 dynamic_nodes)
    if not sites:
        raise EdgeqError("qat: no nn.Linear of the PyTorch model matches a quantized MatMul of the ONNX graph "
                         "(its weights differ from the exported ones)")
    student = emulate(copy.deepcopy(teacher), sites, reduce_range).eval()
    quantize_tables(model, student, dynamic_nodes)
    # the Linear weights, and the biases whose initializer was found (write_back has somewhere to put them)
    weights = [p for n, p in student.named_parameters() if any(
        n == f"{s.linear}.weight" or (n == f"{s.linear}.bias" and s.bias) for s in sites)]
    for p in weights:
        p.requires_grad_(True)
    scales = [p for n, p in student.named_parameters() if n.endswith("_log_scale")]
    opt = torch.optim.Adam([{"params": weights, "lr": config.lr}, {"params": scales, "lr": config.scale_lr}])
    samples = data.calibration_samples()
    count = len(next(iter(samples.values()))) if isinstance(samples, dict) else len(samples)
    accepted = set(inspect.signature(teacher.forward).parameters)
    generator = np.random.default_rng(config.seed)

    def epochs():
        while True:
            order = generator.permutation(count)
            shuffled = ({k: v[order] for k, v in samples.items()} if isinstance(samples, dict)
                        else [samples[i] for i in order])
            yield from data.batches(shuffled, config.batch_size)

    def out(m, feeds):
        o = m(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items() if k in accepted})
        return o.logits if task == "text-classification" else o.last_hidden_state

    losses = []
    batches = epochs()
    for _ in track(range(config.steps), config.steps, "qat step"):
        feeds = next(batches)
        with torch.no_grad():
            target = out(teacher, feeds)
        mask = torch.from_numpy(feeds["attention_mask"]) if "attention_mask" in feeds else None
        loss = _loss(out(student, feeds), target, mask)
        if not torch.isfinite(loss):
            raise EdgeqError(f"qat: the loss diverged at step {len(losses) + 1} (lower --qat-lr or --qat-scale-lr)")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    n = max(1, min(10, len(losses) // 2))
    write_back(model, student, sites)
    return {"ranges": learnt_ranges(student), "sites": len(sites), "static": sum(s.static for s in sites),
            "samples": count, "loss_first": round(float(np.mean(losses[:n])), 6),
            "loss_last": round(float(np.mean(losses[-n:])), 6)}
