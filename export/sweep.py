"""Export many registered models with random weights and report parity, ops and timings (a smoke check of the
exporter over the whole zoo; `tests/test_export_models.py` runs it in parallel worker processes).

    python -m export.sweep --models 'mobilenetv3*' --size 64 --json out.json
    python -m export.sweep --size 96 --quantization int8

Random weights come from `export.weights.random_variables` (no init compile), with BatchNorm statistics measured on
random inputs (`export.weights.calibrate_batch_stats`). int8 calibrates on random normal inputs,
which is enough to check that the graph converts and stays in one XNNPACK partition, not for accuracy.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
import traceback

import numpy as np


def check_model(name: str, input_hw: tuple[int, int], quantization: str | None = None, seed: int = 0,
                num_verify: int = 4) -> dict:
    """Export `name` at `input_hw` with random weights; a JSON-able record (an `error` key when it failed)."""
    import zoo
    from export.tflite import to_tflite
    from export.weights import calibrate_batch_stats, random_variables
    from zoo.layers.conv import depthwise_impl
    from zoo.registry import get_entry

    t0 = time.perf_counter()
    rec: dict = {"model": name, "input_hw": list(input_hw), "quantization": quantization or "fp32"}
    try:
        cfg = get_entry(name).cfg
        module = zoo.create_model(name)
        shape = (1, *input_hw, cfg.in_chans)
        variables = random_variables(module, shape, seed)
        rng = np.random.default_rng(seed + 1)
        x = rng.standard_normal((num_verify, *shape[1:])).astype(np.float32)
        kwargs = {"representative_data": rng.standard_normal((8, *shape[1:])).astype(np.float32)} \
            if quantization == "int8" else {}
        # native depthwise for the reference too: a few small inputs, so its faster compile wins (see tflite.py)
        with depthwise_impl("native"):
            # BatchNorm statistics from random inputs: with unit statistics the activations of a random network can
            # grow layer by layer (LeViT's logits reach 1e5), where float32 rounding alone moves the output
            variables = calibrate_batch_stats(module, variables, rng.standard_normal((8, *shape[1:])).astype(np.float32))
            res = to_tflite(module, variables, cfg=cfg, input_hw=input_hw, quantization=quantization, verify_data=x,
                            progress=False, **kwargs)
        rec.update(export_record(res))
    except Exception as e:  # one failing model must not hide the others
        rec.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8))
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def export_record(res) -> dict:
    """The JSON-able record of an `export.to_tflite` result: verification figures, ops, partitions, size, timings."""
    v = res.verification
    return dict(
        ok=True, max_abs_diff=v.max_abs_diff, tolerance=v.tolerance, logit_scale=v.reference_max_abs,
        sqnr_db=v.sqnr_db, top1_agreement=v.top1_agreement, jax_fp32_error=v.jax_fp32_error,
        tflite_fp64_error=v.tflite_fp64_error, within_fp32_rounding=v.within_fp32_rounding,
        ops=res.ops.ops, num_ops=res.ops.num_ops,
        unsupported=res.ops.unsupported, float_islands=[list(i) for i in res.ops.float_islands],
        partitions=res.delegate.partitions if res.delegate else None,
        not_delegated=res.delegate.not_delegated if res.delegate else None,
        size_bytes=res.size_bytes, timings={k: round(t, 2) for k, t in res.timings.items()},
    )


def main(argv=None) -> int:
    import zoo

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="*", help="comma-separated names or globs (default: all)")
    p.add_argument("--size", type=int, nargs="+", default=[64], help="input H [W] (default 64)")
    p.add_argument("--quantization", default=None, choices=("fp32", "fp16", "dynamic", "int8"))
    p.add_argument("--json", help="write the records to this file")
    args = p.parse_args(argv)
    pats = [s.strip() for s in args.models.split(",") if s.strip()]
    names = [n for n in zoo.list_models(task="classification") if any(fnmatch.fnmatch(n, pt) for pt in pats)]
    hw = (args.size[0], args.size[-1])
    q = None if args.quantization in (None, "fp32") else args.quantization
    records = []
    for name in names:
        rec = check_model(name, hw, q)
        records.append(rec)
        status = (f"max|diff| {rec['max_abs_diff']:.2g} (logits {rec['logit_scale']:.2g}), SQNR {rec['sqnr_db']:.0f} dB"
                  f", {rec['num_ops']} ops, {rec['partitions']} partition(s)") if rec["ok"] else rec["error"][:300]
        print(f"{name}: {'ok' if rec['ok'] else 'FAILED'} in {rec['seconds']:.1f} s: {status}", flush=True)
        if args.json:  # rewritten after each model, so a killed run keeps what it finished
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
