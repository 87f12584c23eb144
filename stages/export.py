"""export: the trained model as models/model.onnx for onnxruntime (fp32, or int8 per export.quantize), kept only
when it matches the PyTorch model on the test split; its checks in reports/export.json, both logged to the train run
with a servable classifier that runs on onnxruntime."""

from __future__ import annotations

import json
import sys

from kennel import track
from kennel.core.params import Params
from kennel.core.paths import AUDITED, EXPORT_REPORT, MODEL, ONNX_MODEL, RUN_FILE, project_root
from kennel.core.stage import run_stage
from kennel.export.onnx_export import export_from_splits
from kennel.model.inference import load_model_file
from kennel.track.serving import log_serving_model


def export_stage(params: Params) -> None:
    e = params.export
    report = export_from_splits(load_model_file(MODEL), ONNX_MODEL, AUDITED, quantize=e.quantize, sample=e.sample,
                                tolerance=e.tolerance, max_drop=e.max_drop)
    report["torch_bytes"] = MODEL.stat().st_size
    EXPORT_REPORT.parent.mkdir(parents=True, exist_ok=True)
    EXPORT_REPORT.write_text(json.dumps(report, indent=1) + "\n")
    run_id = track.read_run_file(RUN_FILE)
    with track.open_run(project_root(), params.mlflow.experiment, run_id=run_id):
        track.log_artifacts([ONNX_MODEL, EXPORT_REPORT], "onnx")
        track.log_metrics({f"export_{k}": v for k, v in report.items()
                           if isinstance(v, int | float) and not isinstance(v, bool)})
        serving_uri = track.retry(log_serving_model, ONNX_MODEL, name="classifier-onnx", runtime="onnx")
        track.set_tags({"kennel.onnx_uri": f"runs:/{run_id}/onnx/{ONNX_MODEL.name}",
                        "kennel.onnx_serving_uri": serving_uri, "kennel.onnx_quantize": e.quantize})
    print(f"exported {ONNX_MODEL} ({e.quantize}, {report['bytes'] / 2**20:.1f} MiB): max probability difference "
          f"{report['max_prob_diff']:.2g} on {report['images']} test image(s)"
          + (f", int8 test accuracy {report['accuracy_int8']:.4f} (drop {report['int8_drop']:.4f})"
             if e.quantize == "int8" else ""))


def main(argv=None) -> int:
    return run_stage("export", export_stage, argv)


if __name__ == "__main__":
    sys.exit(main())
