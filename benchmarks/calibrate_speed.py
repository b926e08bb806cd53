"""`quantlab calibrate` per method and variant on real-model histogram files, next to the 1 s target and the peers.

Per model (default ppocrv4_rec: 404 tensors; ppocrv4_det has 331) its histograms are collected from the benchmark set
(benchmarks/realmodels.py; 2048 |x| bins, 4096 signed) unless --histograms names a file. For every method and KL
variant, printed in one table:
  quantlab s    `quantlab.calibrate` of the whole file: the best of --repeat calls after a first one (cold: the tables
                that depend on the bin count built; shown apart);
  CLI s         the whole `quantlab calibrate FILE -o thresholds.json` process (interpreter, imports, file read), once;
  <= 1 s        quantlab s against the issue's target;
  peer          the reference implementation of the same threshold, run on --peer-tensors tensors spread over the
                file and scaled to the whole file (it takes ~0.1-4 s a tensor): ModelOpt's `_compute_amax_entropy`
                (kl modelopt), `_compute_amax_mse` with its arguments passed by name (mse; ModelOpt 0.47 passes num_bits
                as a bias, see docs/kl.md) and `_compute_amax_percentile` (percentile), ONNX Runtime's
                `get_entropy_threshold` (kl onnxruntime). kl tensorrt has no public implementation, max none worth
                timing. Needs torch + nvidia-modelopt for ModelOpt's ("not installed" otherwise);
  peer / quantlab, and "same": how many of the sampled tensors got the peer's threshold (relative difference <= 1e-6).
--quantlab DIR measures the quantlab package in DIR (another checkout, e.g. a `git worktree` of an older commit: a
before/after comparison on the same machine).
Usage: python benchmarks/calibrate_speed.py [--models ppocrv4_rec,ppocrv4_det] [--histograms FILE] [--repeat 5]
       [--peer-tensors 6] [--quantlab DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TARGET = 1.0
CASES = [("kl", {"variant": "tensorrt"}), ("kl", {"variant": "modelopt"}), ("kl", {"variant": "onnxruntime"}),
         ("max", {}), ("percentile", {}), ("mse", {})]


def label(method: str, options: dict) -> str:
    return method + "".join(f" {value}" for value in options.values())


def modelopt_peers():
    """Peer functions hist -> amax from ModelOpt, or None without torch/modelopt."""
    try:
        import kl_speed
        from modelopt.torch.quantization import tensor_quant
        from modelopt.torch.quantization.calib import histogram as module
    except Exception as exc:  # noqa: BLE001 (torch, modelopt or one of their imports missing)
        print(f"ModelOpt not installed ({type(exc).__name__}: {exc}): its peers are skipped")
        return None
    import inspect

    forward = tensor_quant.FakeTensorQuantFunction.forward
    if list(inspect.signature(forward).parameters)[3] == "bias":  # ModelOpt 0.47's call passes num_bits as the bias
        module.fake_tensor_quant = lambda x, amax, num_bits, unsigned: tensor_quant.FakeTensorQuantFunction.apply(
            x, amax, None, num_bits, unsigned)

    def folded(call):
        def peer(hist):
            hist = hist.fold() if hist.is_signed else hist
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return float(call(hist.counts.copy(), hist.edges))
        return peer

    return {
        ("kl", "modelopt"): lambda hist: kl_speed.modelopt_entropy(module, hist),
        ("mse", None): folded(lambda counts, edges: module._compute_amax_mse(counts, edges, 8, False, 1, 128)),
        ("percentile", None): folded(lambda counts, edges: module._compute_amax_percentile(counts, edges, 99.99)),
    }


def peer_for(method: str, options: dict, modelopt):
    """(peer name, function hist -> amax or None when not installed), or None where there is no peer."""
    import kl_speed

    key = (method, options.get("variant"))
    if key == ("kl", "onnxruntime"):
        return "ONNX Runtime get_entropy_threshold", kl_speed.ort_entropy
    names = {("kl", "modelopt"): "ModelOpt _compute_amax_entropy", ("mse", None): "ModelOpt _compute_amax_mse",
             ("percentile", None): "ModelOpt _compute_amax_percentile"}
    if key not in names:
        return None
    return names[key], (modelopt or {}).get(key)


def histogram_file(model: str, directory: Path) -> Path:
    import quantlab
    import realmodels

    case = realmodels.prepare(model)
    path = directory / f"{model}.npz"
    quantlab.collect(case.model, case.calib, bins=2048).save(path)
    return path


def cli_seconds(path: Path, method: str, options: dict, quantlab_dir: Path, out: Path) -> float:
    code = f"import sys; sys.path.insert(0, {str(quantlab_dir)!r}); from quantlab.cli import main; main()"
    command = [sys.executable, "-c", code, "calibrate", str(path), "-o", str(out), "--method", method]
    command += [f"--{key}={value}" for key, value in options.items()]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def measure(path: Path, args, modelopt) -> list[dict]:
    import quantlab

    histograms = quantlab.load_histograms(path)
    names = list(histograms)
    sample = [names[i] for i in np.linspace(0, len(names) - 1, args.peer_tensors).astype(int)]
    rows = []
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")  # tensors left in float are named once per call
        for method, options in CASES:
            from quantlab.calibration import kl, mse

            for table in (kl._group_table, kl._ort_table, getattr(mse, "_table", None)):
                if table is not None:
                    table.cache_clear()
            start = time.perf_counter()
            amaxes = quantlab.calibrate(histograms, method, **options)
            cold = time.perf_counter() - start
            warm = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                quantlab.calibrate(histograms, method, **options)
                warm.append(time.perf_counter() - start)
            row = {"label": label(method, options), "seconds": min(warm), "cold": cold,
                   "cli": cli_seconds(path, method, options, args.quantlab, Path(tmp) / "t.json")}
            peer = peer_for(method, options, modelopt)
            if peer:
                row["peer"], function = peer
                if function is not None:
                    spent, same = 0.0, 0
                    for name in sample:
                        start = time.perf_counter()
                        reference = function(histograms[name])
                        spent += time.perf_counter() - start
                        ours = amaxes.get(name)
                        same += ours is not None and abs(ours - reference) <= 1e-6 * max(abs(reference), 1e-30)
                    row["peer seconds"] = spent / len(sample) * len(histograms)
                    row["same"] = f"{same}/{len(sample)}"
            rows.append(row)
    return rows


def print_table(model: str, tensors: int, rows: list[dict], args) -> None:
    print(f"\ncalibrate on {model}: {tensors} tensors, 2048 |x| bins; quantlab s = best of {args.repeat} after a cold "
          f"call; peer s scaled from {args.peer_tensors} tensors")
    header = f"{'method':<16} {'quantlab s':>10} {'cold s':>7} {'CLI s':>6} {'<= 1 s':>6}  {'peer':<36} {'peer s':>9} " \
             f"{'peer/quantlab':>13} {'same':>5}"
    print(header)
    print("-" * len(header))
    for row in rows:
        peer = row.get("peer", "-")
        if "peer" in row and "peer seconds" not in row:
            peer_s, ratio, same = "not installed", "-", "-"
        elif "peer seconds" in row:
            peer_s, ratio, same = f"{row['peer seconds']:.3g}", f"{row['peer seconds'] / row['seconds']:.3g}x", row["same"]
        else:
            peer_s, ratio, same = "-", "-", "-"
        print(f"{row['label']:<16} {row['seconds']:>10.3f} {row['cold']:>7.3f} {row['cli']:>6.2f} "
              f"{'ok' if row['seconds'] <= TARGET else 'MISS':>6}  {peer:<36} {peer_s:>9} {ratio:>13} {same:>5}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ppocrv4_rec", help="comma-separated models of the benchmark set")
    parser.add_argument("--histograms", type=Path, help="a histogram file instead of collecting --models")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per method after the cold one (best)")
    parser.add_argument("--peer-tensors", type=int, default=6, help="tensors the peers run on (scaled to the file)")
    parser.add_argument("--quantlab", type=Path, default=HERE.parent, help="directory holding the quantlab to measure")
    args = parser.parse_args()
    sys.path.insert(0, str(args.quantlab))
    sys.path.insert(1, str(HERE))
    import quantlab

    print(f"quantlab from {Path(quantlab.__file__).parent}")
    modelopt = modelopt_peers()
    with tempfile.TemporaryDirectory() as tmp:
        files = {args.histograms.stem: args.histograms} if args.histograms else {
            model: histogram_file(model, Path(tmp)) for model in args.models.split(",")}
        for model, path in files.items():
            rows = measure(path, args, modelopt)
            print_table(model, len(quantlab.load_histograms(path)), rows, args)


if __name__ == "__main__":
    main()
