//! End-to-end tests of the workspace against golden fixtures from the reference implementations
//! (bitsandbytes, transformers, PEFT). One test binary; one module per subject.

mod bnb_checkpoint;
mod cube;
mod fixture;
mod hostile_input;
mod llama_parity;
mod lora_peft;
mod nf4_golden;
mod optim_reference;
mod smollm2;
mod trainer;
