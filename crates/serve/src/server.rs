//! The HTTP side: axum routes in OpenAI's shapes over the scheduler's job channel.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use formats::tokenizer::TextTokenizer;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::api::{self, Endpoint, Limits, Prepared, TextAssembler};
use crate::engine::{Event, Finish, Job, Stats};
use crate::error::ApiError;

/// What the handlers share.
pub struct AppState {
    pub tokenizer: Arc<TextTokenizer>,
    /// The base's name first, then each adapter's.
    pub models: Vec<String>,
    pub form: api::PromptForm,
    pub context: usize,
    pub vocab: usize,
    pub max_tokens_cap: usize,
    pub max_body_bytes: usize,
    pub api_key: Option<String>,
    pub jobs: mpsc::Sender<Job>,
    pub stats: Arc<Stats>,
    /// Unix seconds at start (the models' `created`).
    pub created: u64,
    pub next_id: AtomicU64,
}

/// A JSON response.
pub fn json_response(status: StatusCode, value: &Value) -> Response {
    let mut response = Response::new(Body::from(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

/// The router: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/health`; anything else is a JSON 404.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|uri: Uri| async move { ApiError::no_route(uri.path()) })
        .with_state(state)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Checks `Authorization: Bearer KEY` when the server has a key (compared in constant time).
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else { return Ok(()) };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::unauthorized("missing API key: send `Authorization: Bearer <key>`"))?;
    let (a, b) = (given.trim().as_bytes(), key.as_bytes());
    let differ = a.len() != b.len() || a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) != 0;
    if differ { Err(ApiError::unauthorized("incorrect API key")) } else { Ok(()) }
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let s = &state.stats;
    json_response(
        StatusCode::OK,
        &json!({
            "status": "ok",
            "active": s.active.load(Ordering::Relaxed),
            "steps": s.steps.load(Ordering::Relaxed),
            "tokens": s.tokens.load(Ordering::Relaxed),
            "max_batch_seen": s.max_batch_seen.load(Ordering::Relaxed),
            "cancelled": s.cancelled.load(Ordering::Relaxed),
        }),
    )
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let base = &state.models[0];
    let data: Vec<Value> = state
        .models
        .iter()
        .enumerate()
        .map(|(i, id)| {
            json!({
                "id": id,
                "object": "model",
                "created": state.created,
                "owned_by": "qlora",
                "root": id,
                "parent": if i == 0 { Value::Null } else { Value::String(base.clone()) },
            })
        })
        .collect();
    Ok(json_response(StatusCode::OK, &json!({"object": "list", "data": data})))
}

async fn chat(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    complete(state, headers, body, Endpoint::Chat).await
}

async fn completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    complete(state, headers, body, Endpoint::Completion).await
}

/// Bodies up to this many times the limit are read to the end before a 413, so that the client gets the
/// answer instead of a reset connection; larger ones are cut off.
const DRAIN_FACTOR: usize = 4;

/// The body, at most `limit` bytes (413 beyond).
async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit.saturating_mul(DRAIN_FACTOR)) {
        return Err(ApiError::too_large(limit));
    }
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("reading the body: {e}")))?;
        total += chunk.len();
        if total <= limit {
            bytes.extend_from_slice(&chunk);
        } else if total > limit.saturating_mul(DRAIN_FACTOR) {
            break;
        }
    }
    if total > limit { Err(ApiError::too_large(limit)) } else { Ok(Bytes::from(bytes)) }
}

/// One request: checked, queued, answered whole or streamed.
async fn complete(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Body,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let body = read_body(body, &headers, state.max_body_bytes).await?;
    let serial = state.next_id.fetch_add(1, Ordering::Relaxed);
    let limits = Limits {
        tokenizer: &state.tokenizer,
        models: &state.models,
        form: state.form,
        context: state.context,
        vocab: state.vocab,
        max_tokens_cap: state.max_tokens_cap,
    };
    let default_seed = (now() << 20) ^ serial;
    let prepared = api::prepare(endpoint, &body, &limits, default_seed)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        prompt: prepared.prompt.clone(),
        adapter: prepared.adapter,
        sampling: prepared.sampling.clone(),
        events: tx,
    };
    state.jobs.try_send(job).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => ApiError::overloaded("too many requests are waiting; try again later"),
        mpsc::error::TrySendError::Closed(_) => ApiError::overloaded("the scheduler has stopped"),
    })?;
    let id = match endpoint {
        Endpoint::Chat => format!("chatcmpl-{serial}"),
        Endpoint::Completion => format!("cmpl-{serial}"),
    };
    let reply = Reply { state, id, created: now(), endpoint, prepared };
    if reply.prepared.stream { Ok(reply.stream(rx)) } else { reply.whole(rx).await }
}

struct Reply {
    state: Arc<AppState>,
    id: String,
    created: u64,
    endpoint: Endpoint,
    prepared: Prepared,
}

impl Reply {
    fn usage(&self, completion_tokens: usize) -> Value {
        let prompt = self.prepared.prompt.len();
        json!({"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens})
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.prepared.model, "choices": choices})
    }

    /// Waits for the whole generation.
    async fn whole(self, mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Response, ApiError> {
        let mut text = TextAssembler::new(self.state.tokenizer.clone(), self.prepared.stop.clone());
        let finish = loop {
            match rx.recv().await {
                Some(Event::Token(id)) => {
                    text.push(id);
                    if text.stopped() {
                        break Finish::Stop;
                    }
                }
                Some(Event::Finished(finish)) => break finish,
                Some(Event::Failed(message)) => {
                    return Err(ApiError::internal(format!("generation failed: {message}")));
                }
                None => return Err(ApiError::internal("the scheduler stopped")),
            }
        };
        // Dropping the receiver takes the sequence out of the batch (after a stop string).
        drop(rx);
        let content = text.text().to_string();
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0, "message": {"role": "assistant", "content": content},
                "finish_reason": finish.as_str(), "logprobs": null
            }),
            Endpoint::Completion => {
                json!({"index": 0, "text": content, "finish_reason": finish.as_str(), "logprobs": null})
            }
        };
        let mut body = self.envelope(false, json!([choice]));
        body["usage"] = self.usage(text.token_count());
        Ok(json_response(StatusCode::OK, &body))
    }

    fn delta_choice(&self, delta: Option<&str>, first: bool, finish: Option<Finish>) -> Value {
        let finish = finish.map(Finish::as_str);
        match self.endpoint {
            Endpoint::Chat => {
                let mut d = json!({});
                if first {
                    d["role"] = json!("assistant");
                }
                if let Some(t) = delta {
                    d["content"] = json!(t);
                }
                json!({"index": 0, "delta": d, "finish_reason": finish, "logprobs": null})
            }
            Endpoint::Completion => {
                json!({"index": 0, "text": delta.unwrap_or(""), "finish_reason": finish, "logprobs": null})
            }
        }
    }

    /// Server-sent events: a chunk per piece of final text, a last chunk with the finish reason, the usage
    /// chunk when asked for, then `data: [DONE]`. A client that goes away drops the stream and with it the
    /// receiver, which stops the sequence.
    fn stream(self, rx: mpsc::UnboundedReceiver<Event>) -> Response {
        struct Streaming {
            reply: Reply,
            rx: mpsc::UnboundedReceiver<Event>,
            text: TextAssembler,
            first: bool,
            done: bool,
            tail: Vec<String>,
        }
        let text = TextAssembler::new(self.state.tokenizer.clone(), self.prepared.stop.clone());
        let start = Streaming { reply: self, rx, text, first: true, done: false, tail: Vec::new() };
        let stream = futures_util::stream::unfold(start, |mut s| async move {
            loop {
                if let Some(data) = s.tail.pop() {
                    return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), s));
                }
                if s.done {
                    return None;
                }
                let (delta, finish) = match s.rx.recv().await {
                    Some(Event::Token(id)) => {
                        let delta = s.text.push(id);
                        if s.text.stopped() { (delta, Some(Finish::Stop)) } else { (delta, None) }
                    }
                    Some(Event::Finished(finish)) => (s.text.flush(), Some(finish)),
                    Some(Event::Failed(message)) => {
                        s.done = true;
                        let error = ApiError::internal(format!("generation failed: {message}"));
                        return Some((Ok(SseEvent::default().data(error.body().to_string())), s));
                    }
                    None => {
                        s.done = true;
                        let error = ApiError::internal("the scheduler stopped");
                        return Some((Ok(SseEvent::default().data(error.body().to_string())), s));
                    }
                };
                let r = &s.reply;
                match finish {
                    None if delta.is_empty() && !s.first => continue,
                    None => {
                        let chunk = r.envelope(true, json!([r.delta_choice(Some(&delta), s.first, None)]));
                        s.first = false;
                        return Some((Ok(SseEvent::default().data(chunk.to_string())), s));
                    }
                    Some(finish) => {
                        s.done = true;
                        s.rx.close();
                        // Pushed in reverse: popped from the end.
                        s.tail.push("[DONE]".into());
                        if r.prepared.include_usage {
                            let mut usage = r.envelope(true, json!([]));
                            usage["usage"] = r.usage(s.text.token_count());
                            s.tail.push(usage.to_string());
                        }
                        s.tail.push(r.envelope(true, json!([r.delta_choice(None, false, Some(finish))])).to_string());
                        if !delta.is_empty() || s.first {
                            let chunk = r.envelope(true, json!([r.delta_choice(Some(&delta), s.first, None)]));
                            s.first = false;
                            return Some((Ok(SseEvent::default().data(chunk.to_string())), s));
                        }
                    }
                }
            }
        });
        Sse::new(stream).into_response()
    }
}
