"""Int8 with as few parts kept float as an accuracy target needs: the parts `export.sensitivity` ranks first stay
float, one more at a time, until the export agrees with JAX as well as asked.

    import zoo
    from export.mixed import mixed_int8

    model = zoo.load("mobilenet_v2")
    res = mixed_int8(model, representative_data=calib, verify_data=x, min_agreement=0.95, out="mnv2_mixed.tflite",
                     calibration="percentile")
    res.kept_float          # ("stages_5", "stages_6") on the export test's photo crops
    res.export.summary()    # the written file: ops, float islands, XNNPACK partitions, parity with JAX
    res.all_int8            # the full-int8 export it started from, for comparison

The all-int8 export comes first; if it meets the target, nothing stays float. Otherwise the parts are ranked by the
SQNR each gains when kept float (`int8_sensitivity`, one export per part), and the parts that gain are kept float in
that order, one more per export, up to `max_float_parts`. The first export that meets the target is written to `out`
(its sidecar records the float pattern in `int8_keep_float`); if none does, `ExportParityError` names the figures of
every export tried and nothing is written.

This is what TF's QuantizationDebugger calls selective quantization, at the level of the model's structure. The
float parts cost latency and size: on MobileNetV2 (224x224, LiteRT + XNNPACK, one thread of this 2-core machine) full
int8 runs in 3.4 ms and agrees with JAX on 89.1% of the export test's crops, int8 with stages 5-6 float in 4.4 ms at
95.3% (7.6 MB instead of 4.0), fp32 in 7.1 ms (`bench/mixed_int8.py`). Full int8 with MobileNetV2's stage-5 stream
split by rows (`export.row_split`, on by default where a stream's outliers sit on its first row) reaches 96.9% on
those 64 crops at full-int8 speed, but 91.4-94.1% on 256 (and stages 5-6 float 94.9%: tests/test_export_models.py).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export.errors import ExportParityError
from export.sensitivity import PartSensitivity, int8_sensitivity, parts_pattern
from export.tflite import (DEFAULT_INT8_KEEP_FLOAT, ExportResult, _check_out, _resolve_model, _write_atomic,
                           resolve_keep_float, to_tflite)

DEFAULT_MAX_FLOAT_PARTS = 3


@dataclass(frozen=True)
class MixedInt8:
    export: ExportResult  # the export that met the target (written to `out` when given)
    kept_float: tuple[str, ...]  # the parts kept float, most sensitive first; () when all-int8 met the target
    ranking: list[PartSensitivity] = field(repr=False)  # int8_sensitivity's rows; [] when all-int8 met the target
    tried: list[tuple[tuple[str, ...], float, float]] = field(repr=False)  # (float parts, SQNR dB, agreement)
    all_int8: ExportResult = field(repr=False)  # the first export, nothing kept float (`export` itself when it met)


def meets(verification, min_agreement: float | None, min_sqnr_db: float | None) -> bool:
    """Whether a verification report (or a `PartSensitivity` row) reaches every target given."""
    return ((min_agreement is None or verification.top1_agreement >= min_agreement)
            and (min_sqnr_db is None or verification.sqnr_db >= min_sqnr_db))


def _target(min_agreement, min_sqnr_db) -> str:
    return " and ".join(t for t in (f"top-1 agreement >= {min_agreement:.1%}" if min_agreement is not None else "",
                                    f"SQNR >= {min_sqnr_db:.1f} dB" if min_sqnr_db is not None else "") if t)


def mixed_int8(model_or_module, variables=None, *, representative_data, verify_data, min_agreement: float | None = None,
               min_sqnr_db: float | None = None, parts=None, max_float_parts: int = DEFAULT_MAX_FLOAT_PARTS,
               out: str | Path | None = None, cfg=None, progress: bool = True, **export_options) -> MixedInt8:
    """The int8 export with the fewest float parts (in sensitivity order) that meets the target (module doc).

    min_agreement / min_sqnr_db: the target on verify_data (at least one); verify_data should be real images.
    parts: the candidate parts, as for `int8_sensitivity` (default: the model's top-level parts).
    export_options: passed to every `to_tflite` call (e.g. `calibration="percentile"`, `input_hw`).
    """
    if min_agreement is None and min_sqnr_db is None:
        raise ValueError("mixed_int8 needs a target: min_agreement (e.g. 0.95) and/or min_sqnr_db (e.g. 25)")
    if min_agreement is not None and not 0 < min_agreement <= 1:
        raise ValueError(f"min_agreement is a fraction in (0, 1], got {min_agreement!r}")
    if not isinstance(max_float_parts, int) or max_float_parts < 1:
        raise ValueError(f"max_float_parts must be a positive int, got {max_float_parts!r}")
    if {"quantization", "min_agreement", "int8_keep_float"} & set(export_options):
        raise ValueError("mixed_int8 chooses quantization, min_agreement and int8_keep_float itself; drop them")
    if representative_data is None or verify_data is None:
        raise ValueError("mixed_int8 needs representative_data (calibration) and verify_data (the inputs the target "
                         "is measured on)")
    path = _check_out(out)  # before the exports: a bad path fails now, not after them
    module, variables, cfg, _, name = _resolve_model(model_or_module, variables, cfg, None,
                                                     export_options.pop("name", None), progress)
    x = np.asarray(verify_data)
    target = _target(min_agreement, min_sqnr_db)
    default_keep = resolve_keep_float(DEFAULT_INT8_KEEP_FLOAT, module, variables, (1, *x.shape[1:]))

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    def export(kept: tuple[str, ...]) -> ExportResult:
        return to_tflite(module, variables, quantization="int8", representative_data=representative_data,
                         verify_data=x, cfg=cfg, name=name, progress=False,
                         int8_keep_float=parts_pattern(kept, default_keep), **export_options)

    def done(res: ExportResult, kept, ranking, tried, base: ExportResult) -> MixedInt8:
        if path is not None:
            import json

            from export.metadata import sidecar_path

            _write_atomic(sidecar_path(path), json.dumps(res.metadata, indent=1).encode())
            _write_atomic(path, res.content)
            res = dataclasses.replace(res, path=path)
        say(f"{name}: {'all int8' if not kept else ', '.join(kept) + ' kept float'} meets {target}"
            + (f"; wrote {out}" if out is not None else ""))
        return MixedInt8(res, tuple(kept), ranking, tried, base)

    say(f"{name}: looking for the int8 export with the fewest float parts that meets {target}")
    base = export(())
    if export_options.get("int8_split_top_row", "auto") == "auto":  # the stages "auto" split, found once
        export_options["int8_split_top_row"] = base.metadata["int8_split_top_row"]
    v = base.verification
    tried = [((), round(v.sqnr_db, 2), round(v.top1_agreement, 4))]
    say(f"all int8: SQNR {v.sqnr_db:.2f} dB, top-1 agreement {v.top1_agreement:.1%}")
    if meets(v, min_agreement, min_sqnr_db):
        return done(base, (), [], tried, base)
    ranking = int8_sensitivity(module, variables, representative_data=representative_data, verify_data=x,
                               parts=parts, cfg=cfg, name=name, baseline=base, progress=progress, **export_options)
    order = [r for r in ranking[1:] if r.gain_db > 0]
    for k in range(1, min(max_float_parts, len(order)) + 1):
        kept = tuple(r.part for r in order[:k])
        if k == 1 and not meets(order[0], min_agreement, min_sqnr_db):  # the ranking measured this export already
            tried.append((kept, order[0].sqnr_db, order[0].top1_agreement))
            continue
        res = export(kept)  # (for k == 1: again, to keep the file)
        v = res.verification
        tried.append((kept, round(v.sqnr_db, 2), round(v.top1_agreement, 4)))
        say(f"{', '.join(kept)} float: SQNR {v.sqnr_db:.2f} dB, top-1 agreement {v.top1_agreement:.1%}")
        if meets(v, min_agreement, min_sqnr_db):
            return done(res, kept, ranking, tried, base)
    figures = "; ".join(f"{', '.join(k) or 'all int8'}: {s:.2f} dB, {a:.1%}" for k, s, a in tried)
    raise ExportParityError(f"no int8 export of {name} with up to {max_float_parts} float part(s) meets {target} on "
                            f"{len(x)} input(s) ({figures}); raise max_float_parts, lower the target, or train "
                            "quantization-aware (compress.qat)")
