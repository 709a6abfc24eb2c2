//! One line of `metrics.jsonl`, as `qlora train` writes it (`train::metrics::MetricsLog`):
//!
//! ```text
//! {"kind":"train","step":12,"loss":1.83,"lr":0.0002,"grad_norm":0.41,"tokens_per_s":812.5,"target_tokens":903,
//!  "step_seconds":4.1,"peak_rss_mib":2750.0,"paged_in_bytes":0,"paged_out_bytes":0,"optimizer_state_bytes":...,
//!  "epoch":0.07}
//! {"kind":"eval","step":50,"eval_loss":1.52,"eval_perplexity":4.57}
//! ```
//!
//! Parsing is lenient about what a line carries (a field that is missing or not a number reads as absent) and
//! strict about what makes it a line at all: a JSON object with a known `kind` and an integer `step`.

use serde::{Deserialize, Serialize};

/// A training step: the values the dashboard draws (absent fields are `None`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainPoint {
    pub step: u64,
    pub loss: Option<f64>,
    pub lr: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub step_seconds: Option<f64>,
    /// Peak resident memory of the trainer so far, MiB.
    pub peak_rss_mib: Option<f64>,
    /// Optimizer state bytes paged in / out during the step, and held in all.
    pub paged_in_bytes: Option<f64>,
    pub paged_out_bytes: Option<f64>,
    pub optimizer_state_bytes: Option<f64>,
    pub epoch: Option<f64>,
}

/// A held-out evaluation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    pub step: u64,
    pub loss: Option<f64>,
    pub perplexity: Option<f64>,
}

/// A parsed line.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricsLine {
    Train(TrainPoint),
    Eval(EvalPoint),
    /// A well-formed line of a kind this dashboard does not draw (a newer trainer): skipped, not counted bad.
    Other,
}

/// Why a line was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("not a JSON object: {0}")]
    Json(String),
    #[error("no \"kind\" string")]
    NoKind,
    #[error("no integer \"step\"")]
    NoStep,
}

/// A finite number (JSON has no NaN; a writer that printed one wrote `null`, which reads as absent).
fn num(v: &serde_json::Value, key: &str) -> Option<f64> {
    v.get(key).and_then(serde_json::Value::as_f64).filter(|x| x.is_finite())
}

/// Parses one line (without its newline; a trailing `\r` and surrounding spaces are allowed).
pub fn parse_line(line: &[u8]) -> Result<MetricsLine, LineError> {
    let v: serde_json::Value = serde_json::from_slice(line).map_err(|e| LineError::Json(e.to_string()))?;
    let kind = v.get("kind").and_then(serde_json::Value::as_str).ok_or(LineError::NoKind)?;
    let step = v.get("step").and_then(serde_json::Value::as_u64).ok_or(LineError::NoStep)?;
    Ok(match kind {
        "train" => MetricsLine::Train(TrainPoint {
            step,
            loss: num(&v, "loss"),
            lr: num(&v, "lr"),
            grad_norm: num(&v, "grad_norm"),
            tokens_per_s: num(&v, "tokens_per_s"),
            step_seconds: num(&v, "step_seconds"),
            peak_rss_mib: num(&v, "peak_rss_mib"),
            paged_in_bytes: num(&v, "paged_in_bytes"),
            paged_out_bytes: num(&v, "paged_out_bytes"),
            optimizer_state_bytes: num(&v, "optimizer_state_bytes"),
            epoch: num(&v, "epoch"),
        }),
        "eval" => {
            let loss = num(&v, "eval_loss");
            let perplexity = num(&v, "eval_perplexity").or_else(|| loss.map(f64::exp));
            MetricsLine::Eval(EvalPoint { step, loss, perplexity })
        }
        _ => MetricsLine::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_trainers_lines() {
        let t = br#"{"kind":"train","step":3,"loss":1.5,"lr":0.0002,"grad_norm":0.4,"tokens_per_s":800.0,"target_tokens":9,"step_seconds":2.0,"peak_rss_mib":100.0,"paged_in_bytes":5,"paged_out_bytes":6,"optimizer_state_bytes":7,"epoch":0.1}"#;
        let MetricsLine::Train(p) = parse_line(t).unwrap() else { panic!("train line") };
        assert_eq!((p.step, p.loss, p.grad_norm, p.paged_out_bytes), (3, Some(1.5), Some(0.4), Some(6.0)));
        let e = br#"{"kind":"eval","step":50,"eval_loss":2.0,"eval_perplexity":7.38905609893065}"#;
        assert_eq!(
            parse_line(e).unwrap(),
            MetricsLine::Eval(EvalPoint { step: 50, loss: Some(2.0), perplexity: Some(7.38905609893065) })
        );
        // Perplexity derived when only the loss is there; a null loss reads as absent.
        let MetricsLine::Eval(p) = parse_line(br#"{"kind":"eval","step":1,"eval_loss":0.0}"#).unwrap() else {
            panic!()
        };
        assert_eq!(p.perplexity, Some(1.0));
        let MetricsLine::Train(p) = parse_line(br#" {"kind":"train","step":1,"loss":null} "#).unwrap() else {
            panic!()
        };
        assert_eq!(p.loss, None);
        assert_eq!(parse_line(br#"{"kind":"note","step":1}"#).unwrap(), MetricsLine::Other);
    }

    #[test]
    fn rejects_what_is_not_a_metrics_line() {
        assert!(matches!(parse_line(br#"{"kind":"train","step":1,"loss":1."#), Err(LineError::Json(_))));
        assert!(matches!(parse_line(b"[1,2]"), Err(LineError::NoKind)));
        assert!(matches!(parse_line(br#"{"kind":"train"}"#), Err(LineError::NoStep)));
        assert!(matches!(parse_line(br#"{"kind":"train","step":-1}"#), Err(LineError::NoStep)));
        assert!(matches!(parse_line(b"\xff\xfe"), Err(LineError::Json(_))));
    }
}
