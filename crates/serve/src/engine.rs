//! The scheduler: continuous batching on one thread that owns the model.
//!
//! Requests arrive as [`Job`]s on a bounded channel. Each step the scheduler admits waiting jobs (up to
//! `max_batch` sequences, and at most `max_prefill_tokens` prompt tokens per step beyond the first new one),
//! runs one forward pass over every active sequence together — a new one with its whole prompt, the others
//! with their last token — and picks each sequence's next token with its own sampler. A sequence leaves
//! when it samples a stop token, reaches its `max_tokens`, or its receiver is gone (the client disconnected
//! or the HTTP side stopped it on a stop string). Tokens go back on the job's own channel as [`Event`]s.
//!
//! Sampling is [`sampling::pick`] with a per-sequence seeded generator, step for step what
//! `llama::generate::generate` (or `t5::generate::generate`) does for one sequence, so a sequence's tokens do
//! not depend on its batch.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use llama::batch::BatchRow;
use llama::{KvCache, LlamaModel};
use lora::SideAdapter;
use rand::SeedableRng;
use rand::rngs::StdRng;
use sampling::{SamplingConfig, pick};
use t5::{T5Cache, T5Model};
use tokio::sync::mpsc;

/// Runs batched forward passes: the model behind the scheduler (a trait so that the scheduler can be
/// tested with a scripted model).
pub trait Decoder: Send + 'static {
    type Cache: Send;
    /// A fresh, empty cache for one sequence.
    fn new_cache(&self) -> Self::Cache;
    /// Logits of the last position of each row, after running each row's `tokens` through its cache with its
    /// adapter (`None`: the base).
    fn step(&self, rows: &mut [DecodeRow<'_, Self::Cache>]) -> Result<Vec<Vec<f32>>, String>;
    /// The tokens the sampler's repetition penalty sees before the first new one: the prompt for a model
    /// that continues it, the decoder's start token for an encoder–decoder.
    fn initial_context(&self, prompt: &[u32]) -> Vec<u32> {
        prompt.to_vec()
    }
}

/// One sequence of a step.
pub struct DecodeRow<'a, C> {
    pub tokens: &'a [u32],
    pub cache: &'a mut C,
    pub adapter: Option<usize>,
}

/// The Llama model with its side adapters (indexed as the server's adapter list).
pub struct LlamaDecoder {
    pub model: LlamaModel,
    pub adapters: Vec<SideAdapter>,
}

impl Decoder for LlamaDecoder {
    type Cache = KvCache;

    fn new_cache(&self) -> KvCache {
        self.model.new_cache()
    }

    fn step(&self, rows: &mut [DecodeRow<'_, KvCache>]) -> Result<Vec<Vec<f32>>, String> {
        let mut batch: Vec<BatchRow> = Vec::with_capacity(rows.len());
        for row in rows.iter_mut() {
            let adapter = match row.adapter {
                Some(i) => Some(self.adapters.get(i).ok_or_else(|| format!("no adapter {i}"))?),
                None => None,
            };
            batch.push(BatchRow { tokens: row.tokens, cache: &mut *row.cache, adapter });
        }
        let logits = self.model.forward_batch(&mut batch).map_err(|e| e.to_string())?;
        logit_rows(logits)
    }
}

/// A T5 model with its side adapters (indexed as the server's adapter list). A sequence's first step
/// brings its encoder input (the prompt); the decoder starts from `decoder_start` and then goes on one token
/// per step, as `t5::generate::generate` does.
pub struct T5Decoder {
    pub model: T5Model,
    pub adapters: Vec<SideAdapter>,
    /// `decoder_start_token_id`.
    pub decoder_start: u32,
}

impl Decoder for T5Decoder {
    type Cache = T5Cache;

    fn new_cache(&self) -> T5Cache {
        self.model.new_cache()
    }

    fn step(&self, rows: &mut [DecodeRow<'_, T5Cache>]) -> Result<Vec<Vec<f32>>, String> {
        let start = [self.decoder_start];
        let mut batch: Vec<t5::batch::BatchRow> = Vec::with_capacity(rows.len());
        for row in rows.iter_mut() {
            let adapter = match row.adapter {
                Some(i) => Some(self.adapters.get(i).ok_or_else(|| format!("no adapter {i}"))?),
                None => None,
            };
            let (source, tokens) =
                if row.cache.is_empty() { (Some(row.tokens), &start[..]) } else { (None, row.tokens) };
            batch.push(t5::batch::BatchRow { source, tokens, cache: &mut *row.cache, adapter });
        }
        let logits = self.model.forward_batch(&mut batch).map_err(|e| e.to_string())?;
        logit_rows(logits)
    }

    fn initial_context(&self, _prompt: &[u32]) -> Vec<u32> {
        vec![self.decoder_start]
    }
}

/// `[rows, vocab]` f32 logits as one vector per row.
fn logit_rows(logits: burn::tensor::Tensor<2>) -> Result<Vec<Vec<f32>>, String> {
    let [n, vocab] = logits.dims();
    let values = logits.into_data().try_into_vec::<f32>().map_err(|e| format!("{e:?}"))?;
    Ok((0..n).map(|i| values[i * vocab..(i + 1) * vocab].to_vec()).collect())
}

/// Why a sequence ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token (or, decided on the HTTP side, a stop string).
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the scheduler sends back for a job.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The next token (never a stop token).
    Token(u32),
    /// The sequence ended; no more events follow.
    Finished(Finish),
    /// The model failed on this sequence's step; no more events follow.
    Failed(String),
}

/// A generation request for the scheduler.
pub struct Job {
    /// The prompt's token ids (non-empty, checked against the vocabulary and context by the caller).
    pub prompt: Vec<u32>,
    /// Index of the adapter, `None` for the base.
    pub adapter: Option<usize>,
    /// Temperature, top-p, seed and `max_new_tokens` (≥ 1).
    pub sampling: SamplingConfig,
    /// Where the tokens go; dropping the receiver stops the sequence.
    pub events: mpsc::UnboundedSender<Event>,
}

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Prompt tokens admitted into one step at most (one new sequence is always admitted, whatever its length).
    pub max_prefill_tokens: usize,
}

/// Counters the server reports on `/health` (and tests read).
#[derive(Debug, Default)]
pub struct Stats {
    /// Sequences in the batch now.
    pub active: AtomicUsize,
    /// Forward passes run.
    pub steps: AtomicU64,
    /// Tokens generated.
    pub tokens: AtomicU64,
    /// The largest batch a step has run.
    pub max_batch_seen: AtomicUsize,
    /// Sequences that left because their receiver was gone.
    pub cancelled: AtomicU64,
}

struct Sequence<C> {
    job: Job,
    cache: C,
    context: Vec<u32>,
    /// Tokens to run next step: the prompt at first, then the last token.
    pending: Vec<u32>,
    generated: usize,
    rng: StdRng,
}

/// Runs the scheduler until the job channel closes and every sequence has finished. Call it on its own thread.
pub fn run<D: Decoder>(
    decoder: D,
    config: SchedulerConfig,
    stop_ids: Vec<u32>,
    mut jobs: mpsc::Receiver<Job>,
    stats: Arc<Stats>,
) {
    let max_batch = config.max_batch.max(1);
    let mut active: Vec<Sequence<D::Cache>> = Vec::new();
    let mut held: VecDeque<Job> = VecDeque::new();
    let mut open = true;
    loop {
        // Sequences whose client is gone leave before the step.
        let before = active.len();
        active.retain(|s| !s.job.events.is_closed());
        stats.cancelled.fetch_add((before - active.len()) as u64, Ordering::Relaxed);
        if active.is_empty() && held.is_empty() {
            if !open {
                break;
            }
            match jobs.blocking_recv() {
                Some(job) => held.push_back(job),
                None => break,
            }
        }
        // Admit new sequences between steps.
        let mut prefill = 0;
        let mut admitted = 0;
        while active.len() < max_batch {
            let job = match held.pop_front() {
                Some(job) => job,
                None if open => match jobs.try_recv() {
                    Ok(job) => job,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                },
                None => break,
            };
            if job.events.is_closed() {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if admitted > 0 && prefill + job.prompt.len() > config.max_prefill_tokens {
                held.push_front(job);
                break;
            }
            prefill += job.prompt.len();
            admitted += 1;
            let rng = StdRng::seed_from_u64(job.sampling.seed);
            active.push(Sequence {
                cache: decoder.new_cache(),
                context: decoder.initial_context(&job.prompt),
                pending: job.prompt.clone(),
                generated: 0,
                rng,
                job,
            });
        }
        if active.is_empty() {
            continue;
        }
        // Rows of one adapter next to each other, so each adapter's products run once per step.
        active.sort_by_key(|s| s.job.adapter.map_or(0, |a| a + 1));
        stats.active.store(active.len(), Ordering::Relaxed);
        stats.max_batch_seen.fetch_max(active.len(), Ordering::Relaxed);
        let result = {
            let mut rows: Vec<DecodeRow<D::Cache>> = active
                .iter_mut()
                .map(|s| DecodeRow { tokens: &s.pending, cache: &mut s.cache, adapter: s.job.adapter })
                .collect();
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decoder.step(&mut rows)))
                .unwrap_or_else(|_| Err("the model panicked".into()))
                .and_then(|logits| {
                    if logits.len() == rows.len() {
                        Ok(logits)
                    } else {
                        Err(format!("the model returned {} rows for {}", logits.len(), rows.len()))
                    }
                })
        };
        stats.steps.fetch_add(1, Ordering::Relaxed);
        let logits = match result {
            Ok(logits) => logits,
            Err(message) => {
                // The caches may be half-updated: every sequence of the failed step ends.
                for s in active.drain(..) {
                    let _ = s.job.events.send(Event::Failed(message.clone()));
                }
                stats.active.store(0, Ordering::Relaxed);
                continue;
            }
        };
        let mut finished = vec![false; active.len()];
        for ((s, row), done) in active.iter_mut().zip(logits).zip(finished.iter_mut()) {
            let next = pick(row, &s.context, &s.job.sampling, &mut s.rng);
            if stop_ids.contains(&next) {
                let _ = s.job.events.send(Event::Finished(Finish::Stop));
                *done = true;
                continue;
            }
            stats.tokens.fetch_add(1, Ordering::Relaxed);
            s.generated += 1;
            s.context.push(next);
            s.pending = vec![next];
            if s.job.events.send(Event::Token(next)).is_err() {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                *done = true;
            } else if s.generated >= s.job.sampling.max_new_tokens {
                let _ = s.job.events.send(Event::Finished(Finish::Length));
                *done = true;
            }
        }
        let mut i = 0;
        active.retain(|_| {
            i += 1;
            !finished[i - 1]
        });
        stats.active.store(active.len(), Ordering::Relaxed);
    }
    stats.active.store(0, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    /// Each step's rows, `(adapter, new tokens)`, as the scripted model saw them.
    type StepLog = Arc<Mutex<Vec<Vec<(Option<usize>, usize)>>>>;

    /// A scripted model over a vocabulary of 16: the next token is (last token + 1 + adapter) mod 16, as
    /// logits; it records each step's rows (`(adapter, new tokens)`) and can be told to fail.
    struct Script {
        steps: StepLog,
        fail_at_step: Option<usize>,
        delay: Duration,
    }

    impl Decoder for Script {
        type Cache = Vec<u32>;
        fn new_cache(&self) -> Vec<u32> {
            Vec::new()
        }
        fn step(&self, rows: &mut [DecodeRow<'_, Vec<u32>>]) -> Result<Vec<Vec<f32>>, String> {
            std::thread::sleep(self.delay);
            let fail = {
                let mut steps = self.steps.lock().unwrap();
                let fail = Some(steps.len()) == self.fail_at_step;
                steps.push(if fail { Vec::new() } else { rows.iter().map(|r| (r.adapter, r.tokens.len())).collect() });
                fail
            };
            if fail {
                panic!("scripted failure");
            }
            Ok(rows
                .iter_mut()
                .map(|r| {
                    r.cache.extend_from_slice(r.tokens);
                    let next = (r.cache.last().unwrap() + 1 + r.adapter.map_or(0, |a| a as u32 + 1)) % 16;
                    (0..16).map(|t| if t == next { 1.0 } else { 0.0 }).collect()
                })
                .collect())
        }
    }

    struct Harness {
        jobs: mpsc::Sender<Job>,
        steps: StepLog,
        stats: Arc<Stats>,
        thread: std::thread::JoinHandle<()>,
    }

    fn start(max_batch: usize, fail_at_step: Option<usize>, delay_ms: u64) -> Harness {
        let (jobs, rx) = mpsc::channel(64);
        let steps = Arc::new(Mutex::new(Vec::new()));
        let stats = Arc::new(Stats::default());
        let script = Script { steps: steps.clone(), fail_at_step, delay: Duration::from_millis(delay_ms) };
        let config = SchedulerConfig { max_batch, max_prefill_tokens: 64 };
        let s = stats.clone();
        // Token 15 is the stop token.
        let thread = std::thread::spawn(move || run(script, config, vec![15], rx, s));
        Harness { jobs, steps, stats, thread }
    }

    fn job(prompt: &[u32], adapter: Option<usize>, max: usize) -> (Job, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sampling = SamplingConfig::new().with_max_new_tokens(max);
        (Job { prompt: prompt.to_vec(), adapter, sampling, events: tx }, rx)
    }

    fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(e) = rx.blocking_recv() {
            out.push(e);
        }
        out
    }

    #[test]
    fn tokens_stop_tokens_and_lengths() {
        let h = start(4, None, 0);
        let (a, ra) = job(&[1, 2], None, 3);
        let (b, rb) = job(&[12], None, 10);
        let (c, rc) = job(&[5], Some(1), 2);
        for j in [a, b, c] {
            h.jobs.blocking_send(j).unwrap();
        }
        use Event::*;
        assert_eq!(collect(ra), [Token(3), Token(4), Token(5), Finished(Finish::Length)]);
        // 13, 14, then 15 = the stop token (not sent).
        assert_eq!(collect(rb), [Token(13), Token(14), Finished(Finish::Stop)]);
        assert_eq!(collect(rc), [Token(8), Token(11), Finished(Finish::Length)]);
        drop(h.jobs);
        h.thread.join().unwrap();
        assert_eq!(h.stats.tokens.load(Ordering::Relaxed), 7);
        assert_eq!(h.stats.active.load(Ordering::Relaxed), 0);
    }

    /// Sequences join a running batch between steps and leave when done; a step never holds more than
    /// `max_batch` sequences; rows of one adapter are next to each other; new rows bring their prompt.
    #[test]
    fn continuous_batching_joins_and_leaves() {
        let h = start(3, None, 5);
        let (long, r_long) = job(&[0], Some(0), 12);
        h.jobs.blocking_send(long).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut receivers = Vec::new();
        for (i, adapter) in [None, Some(0), None, Some(1)].into_iter().enumerate() {
            let (j, r) = job(&[i as u32, 1, 2], adapter, 2);
            h.jobs.blocking_send(j).unwrap();
            receivers.push(r);
        }
        let mut counts = vec![collect(r_long).len()];
        counts.extend(receivers.into_iter().map(|r| collect(r).len()));
        assert_eq!(counts, [13, 3, 3, 3, 3], "every sequence got all its tokens and a finish");
        drop(h.jobs);
        h.thread.join().unwrap();
        let steps = h.steps.lock().unwrap();
        assert!(steps.iter().all(|s| s.len() <= 3), "max_batch 3: {steps:?}");
        assert!(steps.iter().any(|s| s.len() == 3), "the batch filled up: {steps:?}");
        assert_eq!(steps[0], [(Some(0), 1)], "the first sequence ran alone first");
        let joined = steps.iter().position(|s| s.len() > 1).unwrap();
        assert!(steps[joined].iter().any(|&(_, n)| n == 3), "a newcomer brings its prompt: {steps:?}");
        assert!(steps[joined].contains(&(Some(0), 1)), "the running sequence decodes one token: {steps:?}");
        for s in steps.iter() {
            let keys: Vec<usize> = s.iter().map(|r| r.0.map_or(0, |a| a + 1)).collect();
            assert!(keys.windows(2).all(|w| w[0] <= w[1]), "rows ordered by adapter: {steps:?}");
        }
        assert_eq!(h.stats.max_batch_seen.load(Ordering::Relaxed), 3);
    }

    /// A dropped receiver takes its sequence out of the batch; the others go on.
    #[test]
    fn a_gone_client_stops_its_sequence() {
        let h = start(4, None, 2);
        let (gone, r_gone) = job(&[0], None, 1000);
        let (kept, r_kept) = job(&[0], Some(0), 30);
        h.jobs.blocking_send(gone).unwrap();
        h.jobs.blocking_send(kept).unwrap();
        drop(r_gone);
        assert_eq!(collect(r_kept).len(), 31);
        drop(h.jobs);
        h.thread.join().unwrap();
        assert_eq!(h.stats.cancelled.load(Ordering::Relaxed), 1);
        assert!(h.stats.tokens.load(Ordering::Relaxed) < 100, "the gone sequence did not run on");
    }

    /// A failing step ends the sequences in it with an error; the scheduler keeps serving.
    #[test]
    fn a_failed_step_is_reported_and_survived() {
        let h = start(4, Some(1), 0);
        let (a, ra) = job(&[0], None, 5);
        h.jobs.blocking_send(a).unwrap();
        let events = collect(ra);
        assert!(matches!(events.last(), Some(Event::Failed(m)) if m.contains("panicked")), "{events:?}");
        let (b, rb) = job(&[3], None, 2);
        h.jobs.blocking_send(b).unwrap();
        assert_eq!(collect(rb), [Event::Token(4), Event::Token(5), Event::Finished(Finish::Length)]);
        drop(h.jobs);
        h.thread.join().unwrap();
    }
}
