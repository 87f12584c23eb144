"""A kennel model file as ONNX (fp32, or int8 by static quantization), checked against the PyTorch model before
it is kept: the file is written beside its destination and renamed over it only when the check passes, so a refused
export leaves nothing behind (and an earlier file as it was)."""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

import kennel
from kennel.core.errors import ExportError
from kennel.core.io import atomic_path
from kennel.data.shards import read_index, read_meta, read_split
from kennel.model.inference import LoadedModel, predict_arrays
from kennel.model.network import IMAGENET_MEAN, IMAGENET_STD
from kennel.model.onnx_inference import INPUT, OUTPUT, PREFIX, OnnxModel, load_onnx_model, predict_onnx

log = logging.getLogger(__name__)

# 17 rather than the newest: older onnxruntime deployments load the file too, and these convnets need no newer op.
OPSET = 17
TOLERANCE = 1e-4  # largest difference in any class probability between PyTorch and ONNX fp32
MAX_DROP = 0.005  # largest loss of test accuracy int8 may cost (0.005: half a point)
QUANTIZE = ("none", "int8")
CALIBRATION_IMAGES = 128  # train images whose activations set the int8 ranges
# int8: the stem up to its first depthwise convolution stays in float when that comes this early (MobileNets,
# EfficientNets, ConvNeXt; resnets have none). Depthwise convolutions are int8's hard case: measured on MobileNetV2
# (benchmarks/RESULTS.md, "Export"), the stem's two in float halve int8's difference from fp32 for ~10 % of its
# speed; on resnet18 two float convolutions cost a third of int8's speed.
STEM_CONVS = 3


@dataclass(frozen=True)
class Images:
    """Images to check an export on: uint8 N x 3 x S x S, a name for each (for messages), and the class index of
    each when known (a labelled split: int8's accuracy is measured on it)."""

    arrays: np.ndarray
    names: list[str]
    labels: np.ndarray | None = None


@dataclass(frozen=True)
class Parity:
    """How far the ONNX model's probabilities sit from the PyTorch model's on the same images."""

    images: int
    max_prob_diff: float
    worst_image: str  # the image with the largest difference
    top1_differs: int  # images whose predicted class differs
    first_top1_differs: str  # the first of them ("" when none)

    def problem(self, tolerance: float) -> str:
        """Why the ONNX model cannot stand in for the PyTorch one ("" when it can)."""
        if self.top1_differs:
            return (f"the predicted class differs on {self.top1_differs} of {self.images} image(s), first "
                    f"{self.first_top1_differs}")
        if not self.max_prob_diff <= tolerance:  # NaN fails too
            return (f"probabilities differ by up to {self.max_prob_diff:.3g} (on {self.worst_image}), above the "
                    f"tolerance {tolerance:g}")
        return ""


def split_images(data_dir: Path, split: str, size: int, sample: int | None = None) -> Images:
    """``sample`` evenly spaced images of a split of ``data_dir`` (all when None), labelled, named by label and sha1.
    ExportError when there is no such split or its images are not ``size`` px."""
    if not (Path(data_dir) / "index.csv").is_file():
        raise ExportError(f"{data_dir}: no {split} split to check the export on; run `dvc repro audit` first, or "
                          "pass --images")
    if read_meta(data_dir)["size"] != size:
        raise ExportError(f"{data_dir}: its images are {read_meta(data_dir)['size']} px, the model takes {size} px; "
                          "pass --images")
    images, labels = read_split(data_dir, split)
    index = read_index(data_dir)
    rows = index[index["split"] == split]
    keep = np.arange(len(labels)) if sample is None or sample >= len(labels) else \
        np.linspace(0, len(labels) - 1, sample).round().astype(np.int64)
    names = [f"{split} image {label}/{sha1[:12]}" for label, sha1 in zip(rows["label"], rows["sha1"], strict=True)]
    if not len(keep):
        raise ExportError(f"{data_dir}: the {split} split is empty; pass --images")
    return Images(np.stack([images[int(i)] for i in keep]), [names[i] for i in keep], labels[keep])


def parity(reference: np.ndarray, probs: np.ndarray, names: list[str]) -> Parity:
    diff = np.abs(reference - probs).max(axis=1) if len(probs) else np.zeros(0)
    differs = np.flatnonzero(reference.argmax(axis=1) != probs.argmax(axis=1))
    worst = int(np.nan_to_num(diff, nan=np.inf).argmax()) if len(diff) else 0
    return Parity(len(probs), float(diff.max()) if len(diff) else 0.0, names[worst] if len(diff) else "",
                  len(differs), names[differs[0]] if len(differs) else "")


def contract(model: LoadedModel, quantization: str) -> dict[str, str]:
    """The preprocessing contract, as the ONNX metadata carries it: what a runtime must do to a file before the
    graph sees it, and where the model came from."""
    return {f"{PREFIX}{k}": v for k, v in {
        "classes": json.dumps(model.classes), "size": str(model.size), "mode": model.mode,
        "input": f"{INPUT}: uint8 N x 3 x {model.size} x {model.size}, RGB, 0..255 (normalised inside the graph)",
        "mean": json.dumps(IMAGENET_MEAN), "std": json.dumps(IMAGENET_STD),
        "tta": str(getattr(model.module, "tta", "none")), "arch": model.arch, "version": kennel.__version__,
        "quantization": quantization, "opset": str(OPSET),
    }.items()}


def set_metadata(path: Path, props: dict[str, str]) -> None:
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))


def to_onnx(model: LoadedModel, path: Path) -> None:
    """The fp32 graph: uint8 images with a dynamic batch in, logits out.

    TorchScript's exporter (``dynamo=False``): the torch.export-based default needs onnxscript, and for these
    convolutional graphs both give the same operators."""
    example = torch.zeros((2, 3, model.size, model.size), dtype=torch.uint8)
    module = model.module.to("cpu").eval()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice, once per process, on every export
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})


class _Batches(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch_size: int = 16):
        self.batches = iter([{INPUT: np.ascontiguousarray(images[i:i + batch_size])}
                             for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray) -> list[str]:
    """Static int8 quantization (QDQ, weights per channel), activation ranges from ``calibration``'s images; returns
    the convolutions left in float (``float_convs``).

    Static rather than dynamic: dynamic quantization computes activation ranges per batch at run time and, in
    onnxruntime, quantizes only MatMul/Gemm well; a convnet's time is in its convolutions, which static int8 runs
    as integer kernels. The graph is first optimised (shared constants and folded batch norms resolved, shapes
    inferred), as onnxruntime's quantizer asks."""
    prepared = fp32.with_name(fp32.stem + ".prepared.onnx")
    with _quiet_root_logger():
        quant_pre_process(str(fp32), str(prepared))
        kept = float_convs(onnx.load(str(prepared)).graph)
        quantize_static(str(prepared), str(out), _Batches(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=kept)
    return kept


def float_convs(graph: onnx.GraphProto, within: int = STEM_CONVS) -> list[str]:
    """The Conv nodes up to and including the first depthwise (grouped) one, when it is among the first ``within``
    (the graph is topologically sorted); none otherwise."""
    convs = [node for node in graph.node if node.op_type == "Conv"]
    for k, node in enumerate(convs[:within]):
        if any(a.name == "group" and a.i > 1 for a in node.attribute):
            return [c.name for c in convs[:k + 1]]
    return []


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantizer reports every node it touches on the root logger: keep its warnings, not its INFO."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == labels).mean()) if len(labels) else float("nan")


def export_onnx(model: LoadedModel, output: Path, *, check: Images, quantize: str = "none",
                calibration: np.ndarray | None = None, score: Images | None = None, tolerance: float = TOLERANCE,
                max_drop: float = MAX_DROP) -> dict:
    """Write ``model`` to ``output`` as ONNX, fp32 or (``quantize="int8"``) int8, and return the report (flat:
    the parity numbers, the sizes, int8's accuracy before and after).

    Always: the fp32 graph runs beside the PyTorch model on ``check``; a top-1 that differs or a probability more
    than ``tolerance`` away refuses the export (ExportError naming the worst). int8: quantized with ``calibration``'s
    activation ranges, then scored on ``score`` (labelled) against the fp32 graph; an accuracy drop above
    ``max_drop`` refuses it. Nothing is written at ``output`` unless every check passed.
    """
    if quantize not in QUANTIZE:
        raise ExportError(f"--quantize {quantize!r}: allowed: {' | '.join(QUANTIZE)}")
    if not len(check.arrays):
        raise ExportError("no images to check the export on")
    start = time.perf_counter()
    report: dict = {"format": "onnx", "quantize": quantize, "opset": OPSET, "tolerance": tolerance}
    with tempfile.TemporaryDirectory(prefix="kennel-export-") as tmp, atomic_path(Path(output)) as final:
        fp32 = Path(tmp) / "model.onnx" if quantize == "int8" else final
        to_onnx(model, fp32)
        set_metadata(fp32, contract(model, "none"))
        report["fp32_bytes"] = fp32.stat().st_size
        exported = load_onnx_model(fp32)
        found = parity(predict_arrays(check.arrays, model), predict_onnx(check.arrays, exported), check.names)
        report.update(asdict(found))
        log.info("onnx fp32 vs pytorch on %d image(s): max prob diff %.3g, top-1 differs on %d", found.images,
                 found.max_prob_diff, found.top1_differs)
        if problem := found.problem(tolerance):
            raise ExportError(f"ONNX export refused, nothing written to {output}: {problem}")
        if quantize == "int8":
            report |= _int8(exported, fp32, final, model, calibration, score, max_drop, output)
        report["bytes"] = final.stat().st_size
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def export_from_splits(model: LoadedModel, output: Path, data_dir: Path, *, quantize: str = "none",
                       sample: int | None = 256, check: Images | None = None, tolerance: float = TOLERANCE,
                       max_drop: float = MAX_DROP) -> dict:
    """:func:`export_onnx` with its images from the splits of ``data_dir`` (``data/audited``): ``check`` or else
    ``sample`` test images; int8's calibration from the train split and its score on the whole test split."""
    int8 = quantize == "int8"
    return export_onnx(model, output, check=check or split_images(data_dir, "test", model.size, sample),
                       quantize=quantize, tolerance=tolerance, max_drop=max_drop,
                       calibration=split_images(data_dir, "train", model.size, CALIBRATION_IMAGES).arrays if int8
                       else None, score=split_images(data_dir, "test", model.size) if int8 else None)


def _int8(exported: OnnxModel, fp32: Path, final: Path, model: LoadedModel, calibration: np.ndarray | None,
          score: Images | None, max_drop: float, output: Path) -> dict:
    """Quantize ``fp32`` into ``final`` and score it on ``score``; ExportError when it costs more than ``max_drop``."""
    if calibration is None or not len(calibration) or score is None or score.labels is None or not len(score.arrays):
        raise ExportError("int8 needs calibration images and labelled test images (the train and test splits)")
    kept = quantize_int8(fp32, final, calibration)
    set_metadata(final, contract(model, "int8"))
    reference = predict_onnx(score.arrays, exported)
    probs = predict_onnx(score.arrays, load_onnx_model(final))
    found = parity(reference, probs, score.names)
    before, after = accuracy(reference, score.labels), accuracy(probs, score.labels)
    numbers = {"int8_calibration_images": len(calibration), "int8_float_convs": len(kept),
               "int8_test_images": len(score.arrays),
               "accuracy_fp32": before, "accuracy_int8": after, "int8_drop": before - after, "max_drop": max_drop,
               "int8_top1_agreement": 1 - found.top1_differs / found.images,
               "int8_max_prob_diff": found.max_prob_diff}
    log.info("onnx int8 on %d test image(s): accuracy %.4f (fp32 %.4f), drop %.4f", found.images, after, before,
             before - after)
    if not before - after <= max_drop:
        raise ExportError(f"int8 export refused, nothing written to {output}: test accuracy drops by "
                          f"{before - after:.4f} ({before:.4f} -> {after:.4f} on {found.images} images), above "
                          f"--max-drop {max_drop:g}")
    return numbers
