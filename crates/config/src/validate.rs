//! Checks that involve more than one key, or the file system.

use super::device::{DeviceSpec, DEVICE_NAMES};
use super::schema::Config;

/// Every cross-field problem as `(key, message)`.
pub fn cross_field_issues(c: &Config) -> Vec<(String, String)> {
    let mut issues = Vec::new();
    let mut fail = |key: &str, message: String| issues.push((key.to_string(), message));
    let m = &c.model;
    if m.pretrained.is_none() {
        if m.hidden_size % m.num_attention_heads != 0 {
            fail(
                "model.hidden_size",
                format!(
                    "{} is not divisible by model.num_attention_heads ({})",
                    m.hidden_size, m.num_attention_heads
                ),
            );
        } else if (m.hidden_size / m.num_attention_heads) % 2 != 0 {
            fail(
                "model.hidden_size",
                format!(
                    "head size {} (hidden_size / num_attention_heads) must be even for RoPE",
                    m.hidden_size / m.num_attention_heads
                ),
            );
        }
        if m.num_attention_heads % m.num_key_value_heads != 0 {
            fail(
                "model.num_key_value_heads",
                format!(
                    "model.num_attention_heads ({}) is not divisible by {}",
                    m.num_attention_heads, m.num_key_value_heads
                ),
            );
        }
        if c.training.seq_len > m.max_position_embeddings {
            fail(
                "training.seq_len",
                format!(
                    "{} exceeds model.max_position_embeddings ({})",
                    c.training.seq_len, m.max_position_embeddings
                ),
            );
        }
    }

    let t = &c.training;
    let budgets = [
        t.max_steps.is_some(),
        t.epochs.is_some(),
        t.max_tokens.is_some(),
    ];
    match budgets.iter().filter(|b| **b).count() {
        1 => {}
        0 => fail(
            "training.max_steps",
            "set one of training.max_steps, training.epochs or training.max_tokens".into(),
        ),
        _ => fail(
            "training.max_steps",
            "set only one of training.max_steps, training.epochs, training.max_tokens".into(),
        ),
    }
    if let Some(epochs) = t.epochs {
        if !(epochs > 0.0 && epochs.is_finite()) {
            fail(
                "training.epochs",
                format!("expected a positive number, got {epochs}"),
            );
        }
    }
    if t.max_tokens == Some(0) {
        fail(
            "training.max_tokens",
            "expected a positive number, got 0".into(),
        );
    }
    if let Some(steps) = t.max_steps {
        if t.warmup_steps >= steps {
            fail(
                "training.warmup_steps",
                format!(
                    "{} must be below training.max_steps ({steps})",
                    t.warmup_steps
                ),
            );
        }
    }
    if t.min_lr > t.lr {
        fail(
            "training.min_lr",
            format!("{} is above training.lr ({})", t.min_lr, t.lr),
        );
    }
    if t.device.parse::<DeviceSpec>().is_err() {
        fail(
            "training.device",
            format!("expected {DEVICE_NAMES}, got {:?}", t.device),
        );
    }

    let d = &c.data;
    for (i, root) in d.roots.iter().enumerate() {
        if !root.exists() {
            fail(
                &format!("data.roots.{i}"),
                format!("{} does not exist", root.display()),
            );
        }
    }
    if d.roots.is_empty() {
        fail("data.roots", "list at least one file or folder".into());
    }
    if let Some(tok) = &d.tokenizer {
        if !tok.is_file() {
            fail(
                "data.tokenizer",
                format!("{} does not exist", tok.display()),
            );
        }
    }
    if let Some(max) = d.max_chars {
        if max < d.min_chars {
            fail(
                "data.max_chars",
                format!("{max} is below data.min_chars ({})", d.min_chars),
            );
        }
    }
    for (i, pattern) in d.include.iter().chain(&d.exclude).enumerate() {
        if let Err(e) = globset::Glob::new(pattern) {
            let key = if i < d.include.len() {
                format!("data.include.{i}")
            } else {
                format!("data.exclude.{}", i - d.include.len())
            };
            fail(&key, format!("invalid glob: {e}"));
        }
    }

    if c.lora.target_modules.is_empty() {
        fail("lora.target_modules", "list at least one module".into());
    }

    if let (Some(context), Some(stride)) = (c.eval.context, c.eval.stride) {
        if stride > context {
            fail(
                "eval.stride",
                format!("{stride} exceeds eval.context ({context})"),
            );
        }
    }

    let g = &c.generate;
    if let Some(p) = g.top_p {
        if !(p > 0.0 && p <= 1.0) {
            fail(
                "generate.top_p",
                format!("expected a number in (0, 1], got {p}"),
            );
        }
    }
    if let Some(p) = g.min_p {
        if !(0.0..1.0).contains(&p) {
            fail(
                "generate.min_p",
                format!("expected a number in [0, 1), got {p}"),
            );
        }
    }
    issues
}
