//! # dashboard — a live training dashboard in the browser
//!
//! `qlora dashboard [RUNS_DIR]` and `qlora train --dashboard [PORT]` serve one page that lists every run
//! under a directory (model, dataset, settings, status, step, ETA, last losses) and draws the curves of the
//! selected runs side by side — training loss (raw and smoothed), held-out loss and perplexity, learning
//! rate, gradient norm before clipping, tokens/s, peak memory, paged optimizer bytes — updating as the
//! trainer appends to `metrics.jsonl` (the page polls once a second). The same data is JSON at `/api/runs`
//! and `/api/runs/NAME/metrics`.
//!
//! It sits just below `train` in the stack and depends on no other crate of the workspace: it reads only the
//! files a run leaves (`metrics.jsonl` ([`line`]), `train_config.toml`, `status.json` ([`status`], which
//! the trainer writes with this crate's [`status::StatusFile`])). Reading is incremental and bounded
//! ([`tail`], [`series`]): a half-written line waits for its newline, malformed lines are skipped and counted,
//! a rewritten (resumed) or deleted file starts over, and a huge file costs a fixed number of points per
//! curve. Run names from requests are checked against the listing ([`runs`]), so nothing outside the runs
//! directory can be reached. The page ([`server`]) is hand-written HTML, CSS and JavaScript drawing SVG,
//! compiled into the binary: nothing is fetched from the internet.

pub mod line;
pub mod runs;
pub mod series;
pub mod server;
pub mod status;
pub mod tail;

use std::path::PathBuf;

pub use runs::{ReadLimits, Runs};
pub use server::{bind, router, serve, spawn};

/// Errors of the dashboard.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// No listed run has that name (also every name that would leave the runs directory).
    #[error("no such run")]
    NoSuchRun,
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a run directory (its name must be a plain, non-hidden directory name)", .0.display())]
    BadRunDir(PathBuf),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the dashboard: {0}")]
    Serve(#[source] std::io::Error),
    #[error("internal: {0}")]
    Internal(String),
}
