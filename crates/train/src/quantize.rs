//! `qlora quantize`: a Hugging Face checkpoint → bitsandbytes 4-bit checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use quant::checkpoint::{QuantizeReport, quantize_checkpoint};
use quant::{QuantConfig, QuantError};

/// What `qlora quantize` was asked to do.
#[derive(Debug, Clone)]
pub struct QuantizeArgs {
    pub model: PathBuf,
    pub out: PathBuf,
    pub config: QuantConfig,
}

/// Runs the conversion and returns its report and the seconds it took.
pub fn run(args: &QuantizeArgs) -> Result<(QuantizeReport, f64), QuantError> {
    if same_dir(&args.model, &args.out) {
        return Err(QuantError::InvalidConfig {
            path: args.out.clone(),
            reason: "the output directory must differ from the model directory (its files would be replaced)".into(),
        });
    }
    let start = Instant::now();
    let report = quantize_checkpoint(&args.model, &args.out, &args.config)?;
    Ok((report, start.elapsed().as_secs_f64()))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// A human summary of a conversion.
pub fn summary(args: &QuantizeArgs, report: &QuantizeReport, seconds: f64) -> String {
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    format!(
        "quantized {} linear weights ({:.2} M params) to {} (blocksize {}, double quant {}: {:.3} bits/param), copied {} other tensors\n\
         {:.1} MiB -> {:.1} MiB in {} shard(s), {:.2} s\n\
         wrote {}",
        report.quantized_tensors,
        report.quantized_params as f64 / 1e6,
        args.config.quant_type,
        args.config.blocksize,
        if args.config.double_quant { "on" } else { "off" },
        nf4::bits_per_param(args.config.blocksize, args.config.double_quant),
        report.copied_tensors,
        mib(report.input_bytes),
        mib(report.output_bytes),
        report.shards,
        seconds,
        args.out.display()
    )
}
