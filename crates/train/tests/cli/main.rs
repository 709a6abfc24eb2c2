//! The `qlora` binary end to end, one test binary for all of it (one link of the whole stack instead of one
//! per file): each module drives the real binary, or the trainer's library beside it, the way a user would.

mod common;
mod crash;
mod dashboard;
mod judge;
mod judge_smollm2;
mod serve_openai;
mod t5_cli;
