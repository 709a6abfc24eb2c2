//! # serve — the model behind an OpenAI-compatible HTTP API
//!
//! Above `llama`, `t5` and `data` in the stack (… → formats → llama, t5 → data → serve → train); the
//! `qlora serve` command of `train` calls [`start`]. One base model (4-bit or dense; a decoder-only Llama or
//! an encoder–decoder T5, [`ServedModel`]) is loaded once; any number of PEFT adapters are read beside it
//! ([`lora::SideAdapter`], never merged) and each becomes a model name.
//! axum serves `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (OpenAI's request and
//! response shapes, server-sent events with `data: [DONE]` when `stream` is set) and `GET /health`.
//!
//! A scheduler thread owns the model and batches continuously ([`engine`]): every step runs one forward pass
//! over all active sequences — those of different adapters too, each row with its own LoRA on the shared
//! base product, each sequence with its own KV cache — new requests join between steps and finished or
//! abandoned ones leave (a T5 sequence's first step runs the encoder over its prompt). Greedy output for a
//! model name is `qlora generate`'s with that adapter, token for token. Bad requests get one OpenAI-style
//! error JSON ([`error::ApiError`]); bodies, `max_tokens`, stop strings and the queue are bounded; the server
//! binds 127.0.0.1 unless told otherwise.

pub mod api;
pub mod engine;
pub mod error;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use api::PromptForm;
use formats::tokenizer::TextTokenizer;
use llama::LlamaModel;
use lora::SideAdapter;
use t5::T5Model;
use tokio::sync::mpsc;

pub use error::{ApiError, ServeError};

/// Settings of the server. Defaults: 127.0.0.1:8000, no key, 16 sequences per step.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    /// 0 picks a free port (printed on start).
    pub port: u16,
    /// When set, `/v1/*` requests need `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Requests waiting for a place in the batch at most (more get 503).
    pub max_queue: usize,
    /// Request bodies over this many bytes get 413.
    pub max_body_bytes: usize,
    /// The largest `max_tokens` a request may ask for.
    pub max_tokens_cap: usize,
    /// Prompt tokens admitted into one step at most (beyond the first new sequence).
    pub max_prefill_tokens: usize,
    /// Runtime worker threads for the HTTP side.
    pub http_threads: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            max_batch: 16,
            max_queue: 256,
            max_body_bytes: 1 << 20,
            max_tokens_cap: 4096,
            max_prefill_tokens: 2048,
            http_threads: 2,
        }
    }
}

/// The base model, by family.
pub enum ServedModel {
    /// A decoder-only model: prompt and completion share the context.
    Llama(LlamaModel),
    /// An encoder–decoder: the prompt is the encoder input (ending in `eos`), the answer starts from
    /// `decoder_start`.
    T5 { model: T5Model, decoder_start: u32, eos: u32 },
}

impl ServedModel {
    fn vocab_size(&self) -> usize {
        match self {
            ServedModel::Llama(model) => model.vocab_size,
            ServedModel::T5 { model, .. } => model.vocab_size,
        }
    }
}

/// The model to serve: the base, its tokenizer, and named adapters read beside it.
pub struct Served {
    pub model: ServedModel,
    pub tokenizer: TextTokenizer,
    /// The base's model name.
    pub name: String,
    /// `(name, adapter)` pairs (read with the model's `read_side_adapter`); names must be unique and differ
    /// from the base's.
    pub adapters: Vec<(String, SideAdapter)>,
    /// Positions the model attends to: `max_position_embeddings` for Llama (prompt + completion); for T5
    /// the bound on the encoder input and on the answer each (`n_positions`).
    pub context: usize,
    /// Token ids that end a generation.
    pub stop_ids: Vec<u32>,
}

/// A running server: its address, and the handle to wait on.
pub struct Running {
    pub addr: SocketAddr,
    runtime: tokio::runtime::Runtime,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    scheduler: std::thread::JoinHandle<()>,
}

impl Running {
    /// Serves until the process ends (or the server fails).
    pub fn wait(self) -> Result<(), ServeError> {
        let result = self.runtime.block_on(self.server);
        let _ = self.scheduler.join();
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServeError::Server(e)),
            Err(e) => Err(ServeError::Server(std::io::Error::other(e))),
        }
    }
}

/// Checks the names, binds the address, starts the scheduler thread and the HTTP server.
pub fn start(served: Served, config: &ServeConfig) -> Result<Running, ServeError> {
    let mut names = vec![served.name.clone()];
    for (name, _) in &served.adapters {
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            return Err(ServeError::Config(format!("adapter name `{name}`: give a non-empty name without spaces")));
        }
        if names.contains(name) {
            return Err(ServeError::Config(format!("the model name `{name}` is given twice")));
        }
        names.push(name.clone());
    }
    if config.max_batch == 0 || config.max_queue == 0 || config.max_tokens_cap == 0 {
        return Err(ServeError::Config("--max-batch, the queue and the max_tokens cap must be at least 1".into()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.http_threads.max(1))
        .enable_io()
        .build()
        .map_err(ServeError::Runtime)?;
    let addr = format!("{}:{}", config.host, config.port);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&addr))
        .map_err(|source| ServeError::Bind { addr: addr.clone(), source })?;
    let local = listener.local_addr().map_err(|source| ServeError::Bind { addr, source })?;

    let (jobs, rx) = mpsc::channel(config.max_queue);
    let stats = Arc::new(engine::Stats::default());
    let vocab = served.model.vocab_size();
    let scheduler_config =
        engine::SchedulerConfig { max_batch: config.max_batch, max_prefill_tokens: config.max_prefill_tokens };
    let (stop_ids, scheduler_stats) = (served.stop_ids, stats.clone());
    let adapters = served.adapters.into_iter().map(|(_, a)| a).collect();
    let scheduler = std::thread::Builder::new().name("qlora-scheduler".into());
    let (form, scheduler) = match served.model {
        ServedModel::Llama(model) => {
            let decoder = engine::LlamaDecoder { model, adapters };
            (
                PromptForm::Continue,
                scheduler.spawn(move || engine::run(decoder, scheduler_config, stop_ids, rx, scheduler_stats)),
            )
        }
        ServedModel::T5 { model, decoder_start, eos } => {
            let decoder = engine::T5Decoder { model, adapters, decoder_start };
            (
                PromptForm::Source { eos },
                scheduler.spawn(move || engine::run(decoder, scheduler_config, stop_ids, rx, scheduler_stats)),
            )
        }
    };
    let scheduler = scheduler.map_err(ServeError::Runtime)?;

    let state = Arc::new(server::AppState {
        tokenizer: Arc::new(served.tokenizer),
        models: names,
        form,
        context: served.context,
        vocab,
        max_tokens_cap: config.max_tokens_cap,
        max_body_bytes: config.max_body_bytes,
        api_key: config.api_key.clone(),
        jobs,
        stats,
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        next_id: AtomicU64::new(1),
    });
    let app = server::router(state);
    let server = runtime.spawn(async move { axum::serve(listener, app).await });
    Ok(Running { addr: local, runtime, server, scheduler })
}
