"""Distillation on the demo: accuracy recovered against epochs, and distillation against
plain fine-tuning on hard labels, for the demo CNN with half its channels pruned.

    python bench/distill.py        # writes bench/results/distill.json and prints the table
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "optcc" / "demo" / "digits_cnn.onnx"


def main() -> None:
    from optcc_plugins.distillation import DistillOptions, RecalibrateBatchNormPass, train_distill
    from optcc_plugins.pruning import StructuredPruningPass

    from optcc.data import InputSpec
    from optcc.data.builtin import DigitsOptions, DigitsSource
    from optcc.evaluate import Evaluator
    from optcc.ir import Model
    from optcc.passes import Capability, PassContext

    spec = [InputSpec("image", ("batch", 1, 8, 8), np.dtype(np.float32))]
    teacher = Model.load(DEMO)
    evaluate = Evaluator(DigitsSource(DigitsOptions(split="test", batch_size=397), inputs=spec), teacher)
    train = lambda: DigitsSource(DigitsOptions(split="train", batch_size=64), inputs=spec).batches()  # noqa: E731
    pruned = StructuredPruningPass(ratio=0.5)(teacher.copy()).model
    ctx = PassContext(data={"calibration": DigitsSource(DigitsOptions(split="train", batch_size=64, limit=512), inputs=spec)},
                      capabilities=frozenset({Capability.CALIBRATION_DATA}))
    recalibrated = RecalibrateBatchNormPass()(pruned.copy(), ctx).model
    rows = [{"method": "teacher (fp32, unpruned)", "epochs": 0, "accuracy": evaluate(teacher)["accuracy"]},
            {"method": "pruned 50 %, one-shot", "epochs": 0, "accuracy": evaluate(pruned)["accuracy"]},
            {"method": "+ BatchNorm recalibration", "epochs": 0, "accuracy": evaluate(recalibrated)["accuracy"]}]
    configs = {
        "distillation (KD, T=4)": DistillOptions(learning_rate=0.002),
        "hard labels only (cross-entropy)": DistillOptions(learning_rate=0.002, kd_weight=0.0, label_weight=1.0),
    }
    for name, options in configs.items():
        for epochs in (1, 2, 4, 8):
            opts = options.model_copy(update={"epochs": epochs})
            trained, stats = train_distill(recalibrated, teacher, train, opts, seed=0)
            rows.append({"method": name, "epochs": epochs, "accuracy": evaluate(trained)["accuracy"],
                         "seconds": stats["seconds"]})
    sys.path.insert(0, str(HERE))
    import models

    models.save_results("distill", rows)
    print("| method | epochs | test accuracy | train s |\n|---|---|---|---|")
    for r in rows:
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else "–"
        print(f"| {r['method']} | {r['epochs']} | {100 * r['accuracy']:.2f} % | {seconds} |")


if __name__ == "__main__":
    main()
