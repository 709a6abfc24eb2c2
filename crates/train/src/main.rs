//! `qlora`: finetune 4-bit quantized LLMs with LoRA adapters. See `qlora --help`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nf4::QuantType;
use quant::QuantConfig;
use train::quantize::{self, QuantizeArgs};

#[derive(Parser)]
#[command(name = "qlora", version, about = "QLoRA in Rust: quantize, finetune and run Llama-family models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a Hugging Face checkpoint (safetensors, f32/bf16/f16, sharded or not) to the bitsandbytes
    /// 4-bit layout: every linear weight of the decoder layers quantized, everything else copied.
    Quantize {
        /// The checkpoint directory (config.json + model.safetensors or a sharded index).
        #[arg(long)]
        model: PathBuf,
        /// Output directory (created if missing; must differ from --model).
        #[arg(long)]
        out: PathBuf,
        /// 4-bit data type.
        #[arg(long, default_value = "nf4", value_parser = parse_quant_type)]
        quant_type: QuantType,
        /// Elements per absmax block (a power of two from 32 to 4096).
        #[arg(long, default_value_t = 64)]
        blocksize: usize,
        /// Keep the absmax statistics in f32 instead of quantizing them to 8 bits.
        #[arg(long)]
        no_double_quant: bool,
    },
}

fn parse_quant_type(s: &str) -> Result<QuantType, String> {
    match s.parse::<QuantType>() {
        Ok(QuantType::Int4) => Err("int4 has no bitsandbytes checkpoint layout; use nf4 or fp4".into()),
        Ok(qt) => Ok(qt),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Quantize { model, out, quant_type, blocksize, no_double_quant } => {
            nf4::check_blocksize(blocksize)?;
            let args = QuantizeArgs {
                model,
                out,
                config: QuantConfig::new().with_quant_type(quant_type).with_blocksize(blocksize).with_double_quant(!no_double_quant),
            };
            let (report, seconds) =
                quantize::run(&args).with_context(|| format!("quantizing {}", args.model.display()))?;
            println!("{}", quantize::summary(&args, &report, seconds));
        }
    }
    Ok(())
}
