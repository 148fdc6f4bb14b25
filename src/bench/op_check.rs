//! The rows of `bench --ops`: each fused op against its reference, and the fused AdamW.

use super::rows::{Mode, Preset, Settings};
use candle_core::Device;
use serde_json::{json, Value};

/// One row per fused op at the shapes of `preset` (and once per dtype the edge-case shapes,
/// when `preset` is `None`): the op's relative error against its reference in the compute dtype
/// of `mode`, the tolerance, and forward + backward milliseconds of both.
pub fn op_rows(preset: Option<Preset>, mode: Mode, s: &Settings, device: &Device) -> Vec<Value> {
    use ops::check;
    let dtype = mode.dtype();
    let cases = match preset {
        Some(preset) => check::model_cases(&preset.config(s.seq).op_shape(), s.batch, s.seq),
        None => check::edge_cases(),
    };
    let mut rows = Vec::new();
    for case in cases {
        let preset = preset.map_or("edge", Preset::name);
        let mut row = json!({"tool": "llmtool", "task": "ops", "preset": preset,
                             "mode": mode.name(), "op": case.name, "shapes": case.shapes(),
                             "tolerance": case.tolerance(dtype)});
        match check::run_case(&case, device, dtype, s.steps.clamp(1, 5)) {
            Ok(r) => {
                row["max_rel_error"] = json!(r.error);
                row["ok"] = json!(r.error < case.tolerance(dtype));
                row["fused_ms"] = json!(r.fused_ms);
                row["reference_ms"] = json!(r.reference_ms);
                row["speedup"] = json!(r.reference_ms / r.fused_ms);
            }
            Err(e) => {
                row["ok"] = json!(false);
                row["error"] = json!(format!("{e:#}"));
            }
        }
        rows.push(row);
    }
    rows
}

/// The optimizer row of the op check: fused AdamW and gradient norm against the composite.
pub fn adamw_row(device: &Device) -> Value {
    let tolerance = 1e-5;
    match train::optim::adamw_error(device) {
        Ok(error) => json!({"tool": "llmtool", "task": "ops", "preset": "edge", "mode": "fp32",
                            "op": "adamw", "max_rel_error": error, "tolerance": tolerance,
                            "ok": error < tolerance}),
        Err(e) => json!({"tool": "llmtool", "task": "ops", "op": "adamw", "ok": false,
                         "error": format!("{e:#}")}),
    }
}
