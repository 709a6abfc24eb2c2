//! A blocking client for OpenAI-compatible chat endpoints (`POST {base}/chat/completions`): a hosted
//! model, a local server (vLLM, llama.cpp, `qlora serve`), anything that speaks the protocol.
//!
//! Connection failures, timeouts and HTTP 408 / 429 / 5xx are retried with exponential backoff (a
//! `Retry-After` in seconds is honoured, both capped); other HTTP errors fail at once. The API key goes only
//! into the `Authorization` header: it is never part of an error message or of a cached request.

use std::time::Duration;

use serde_json::{Value, json};

use crate::JudgeError;
use crate::cache::Request;

/// Retry settings.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts after the first.
    pub retries: u32,
    /// The first wait; doubled after each failure.
    pub backoff: Duration,
    /// The longest wait.
    pub max_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { retries: 5, backoff: Duration::from_secs(1), max_backoff: Duration::from_secs(30) }
    }
}

/// Sampling settings of a completion beyond the request itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extra {
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
}

/// An OpenAI-compatible chat endpoint.
pub struct ChatClient {
    agent: ureq::Agent,
    url: String,
    key: Option<String>,
    retry: Retry,
}

/// The chat-completions URL for a base URL: `http://host:port` → `http://host:port/v1/chat/completions`,
/// `https://api.example.com/v1` → `.../v1/chat/completions`; a URL ending in `/chat/completions` is kept.
pub fn completions_url(base: &str) -> Result<String, JudgeError> {
    let base = base.trim().trim_end_matches('/');
    let Some((scheme, rest)) = base.split_once("://") else {
        return Err(JudgeError::Input(format!("`{base}` is not an http(s) URL")));
    };
    if scheme != "http" && scheme != "https" || rest.is_empty() {
        return Err(JudgeError::Input(format!("`{base}` is not an http(s) URL")));
    }
    Ok(if base.ends_with("/chat/completions") {
        base.to_string()
    } else if !rest.contains('/') {
        format!("{base}/v1/chat/completions")
    } else {
        format!("{base}/chat/completions")
    })
}

impl ChatClient {
    /// A client for the endpoint at `base_url` (see [`completions_url`]), with an optional API key and a
    /// per-request timeout.
    pub fn new(base_url: &str, key: Option<String>, timeout: Duration, retry: Retry) -> Result<ChatClient, JudgeError> {
        let url = completions_url(base_url)?;
        let agent = ureq::AgentBuilder::new().timeout(timeout).build();
        Ok(ChatClient { agent, url, key, retry })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends `request` (system message first when not empty) and returns the reply's text.
    pub fn complete(&self, request: &Request, extra: Extra) -> Result<String, JudgeError> {
        let mut messages = Vec::new();
        if !request.system.is_empty() {
            messages.push(("system", request.system.as_str()));
        }
        for (user, assistant) in &request.examples {
            messages.push(("user", user.as_str()));
            messages.push(("assistant", assistant.as_str()));
        }
        messages.push(("user", request.user.as_str()));
        self.chat(&request.model, &messages, request.temperature, request.max_tokens, extra)
    }

    /// Sends a conversation of `(role, content)` messages and returns the reply's text.
    pub fn chat(
        &self,
        model: &str,
        messages: &[(&str, &str)],
        temperature: f64,
        max_tokens: usize,
        extra: Extra,
    ) -> Result<String, JudgeError> {
        let messages: Vec<Value> =
            messages.iter().map(|(role, content)| json!({"role": role, "content": content})).collect();
        let mut body = json!({
            "model": model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "n": 1,
        });
        if let Some(p) = extra.top_p {
            body["top_p"] = json!(p);
        }
        if let Some(s) = extra.seed {
            body["seed"] = json!(s);
        }
        let body = body.to_string();
        let fail = |reason: String| JudgeError::Endpoint { url: self.url.clone(), reason };
        let mut wait = self.retry.backoff;
        let mut attempt = 0;
        loop {
            let mut call = self.agent.post(&self.url).set("Content-Type", "application/json");
            if let Some(key) = &self.key {
                call = call.set("Authorization", &format!("Bearer {key}"));
            }
            let (retryable, reason, retry_after) = match call.send_string(&body) {
                Ok(response) => {
                    let text = response.into_string().map_err(|e| fail(format!("reading the reply: {e}")))?;
                    return reply_text(&text).map_err(fail);
                }
                Err(ureq::Error::Status(code, response)) => {
                    let retry_after = response
                        .header("Retry-After")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = response.into_string().unwrap_or_default();
                    let snippet: String = text.chars().take(300).collect();
                    (code == 408 || code == 429 || code >= 500, format!("HTTP {code}: {snippet}"), retry_after)
                }
                Err(ureq::Error::Transport(t)) => {
                    // Kind, message and cause, without the URL (the error names it once).
                    let mut reason = t.kind().to_string();
                    for part in [t.message().map(str::to_string), std::error::Error::source(&t).map(|s| s.to_string())]
                    {
                        reason.extend(part.map(|p| format!(": {p}")));
                    }
                    (true, reason, None)
                }
            };
            if !retryable || attempt >= self.retry.retries {
                let tries = attempt + 1;
                return Err(fail(format!("{reason} (after {tries} attempt{})", if tries == 1 { "" } else { "s" })));
            }
            attempt += 1;
            std::thread::sleep(retry_after.unwrap_or(wait).min(self.retry.max_backoff));
            wait = (wait * 2).min(self.retry.max_backoff);
        }
    }
}

/// `choices[0].message.content` of a chat-completions reply.
fn reply_text(body: &str) -> Result<String, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("the reply is not JSON: {e}"))?;
    v.pointer("/choices/0/message/content").and_then(Value::as_str).map(str::to_string).ok_or_else(|| {
        format!("the reply has no choices[0].message.content: {}", body.chars().take(300).collect::<String>())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    #[test]
    fn urls() {
        assert_eq!(completions_url("http://127.0.0.1:8080").unwrap(), "http://127.0.0.1:8080/v1/chat/completions");
        assert_eq!(completions_url("https://api.x.com/v1/").unwrap(), "https://api.x.com/v1/chat/completions");
        assert_eq!(completions_url("http://h/v1/chat/completions").unwrap(), "http://h/v1/chat/completions");
        assert!(completions_url("localhost:8080").is_err());
        assert!(completions_url("ftp://h").is_err());
    }

    /// The (head, body) of each request a test server saw.
    type Seen = Arc<Mutex<Vec<(String, String)>>>;

    /// Serves `replies` (status, body) in turn, one per connection, recording each request's head and body.
    fn server(replies: Vec<(u16, String)>) -> (String, Seen) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for (status, body) in replies {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                let mut head = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut request = vec![0; length];
                reader.read_exact(&mut request).unwrap();
                log.lock().unwrap().push((head, String::from_utf8(request).unwrap()));
                let mut stream = reader.into_inner();
                let reply = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(reply.as_bytes()).unwrap();
            }
        });
        (url, seen)
    }

    fn request() -> Request {
        Request {
            model: "j".into(),
            system: "s".into(),
            examples: vec![("u0".into(), "[[B]]".into())],
            user: "u".into(),
            temperature: 0.0,
            max_tokens: 8,
        }
    }

    fn quick() -> Retry {
        Retry { retries: 2, backoff: Duration::from_millis(1), max_backoff: Duration::from_millis(5) }
    }

    #[test]
    fn retries_server_errors_then_succeeds_and_sends_the_key() {
        let ok = r#"{"choices": [{"message": {"role": "assistant", "content": "[[A]]"}}]}"#.to_string();
        let (url, seen) = server(vec![(503, "busy".into()), (429, "slow down".into()), (200, ok)]);
        let client = ChatClient::new(&url, Some("sk-test".into()), Duration::from_secs(10), quick()).unwrap();
        assert_eq!(client.complete(&request(), Extra { top_p: None, seed: Some(3) }).unwrap(), "[[A]]");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        assert!(seen[0].0.contains("/v1/chat/completions") && seen[0].0.contains("Bearer sk-test"));
        let body: Value = serde_json::from_str(&seen[2].1).unwrap();
        assert_eq!(body["messages"][0]["role"], "system");
        let turns: Vec<(&str, &str)> = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        assert_eq!(turns, [("system", "s"), ("user", "u0"), ("assistant", "[[B]]"), ("user", "u")], "examples first");
        assert_eq!(body["max_tokens"], 8);
        assert_eq!(body["seed"], 3);
    }

    #[test]
    fn gives_up_after_the_retries_and_fails_at_once_on_a_client_error() {
        let (url, seen) = server(vec![(500, "a".into()), (500, "b".into()), (500, "c".into())]);
        let client = ChatClient::new(&url, Some("sk-secret".into()), Duration::from_secs(10), quick()).unwrap();
        let e = client.complete(&request(), Extra::default()).unwrap_err().to_string();
        assert!(e.contains("HTTP 500: c (after 3 attempts)"), "{e}");
        assert!(!e.contains("sk-secret"));
        assert_eq!(seen.lock().unwrap().len(), 3);

        let (url, seen) = server(vec![(401, "bad key".into())]);
        let client = ChatClient::new(&url, None, Duration::from_secs(10), quick()).unwrap();
        let e = client.complete(&request(), Extra::default()).unwrap_err().to_string();
        assert!(e.contains("HTTP 401: bad key (after 1 attempt)"), "{e}");
        assert!(!seen.lock().unwrap()[0].0.to_ascii_lowercase().contains("authorization"));

        let (url, _) = server(vec![(200, "{\"choices\": []}".into())]);
        let client = ChatClient::new(&url, None, Duration::from_secs(10), quick()).unwrap();
        assert!(client.complete(&request(), Extra::default()).unwrap_err().to_string().contains("no choices[0]"));
    }

    #[test]
    fn a_closed_port_is_retried_then_reported() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client =
            ChatClient::new(&format!("http://127.0.0.1:{port}"), None, Duration::from_secs(2), quick()).unwrap();
        let e = client.complete(&request(), Extra::default()).unwrap_err().to_string();
        assert!(e.contains("after 3 attempts"), "{e}");
    }
}
