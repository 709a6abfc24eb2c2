//! The HTTP side: the page (HTML, JavaScript and CSS compiled into the binary) and the JSON API.
//!
//! - `GET /`: the dashboard page; `GET /app.js`, `GET /style.css`: its script and styles.
//! - `GET /api/runs`: every run's row ([`crate::runs::RunSummary`]) as `{"root": ..., "runs": [...]}`.
//! - `GET /api/runs/NAME/metrics[?generation=G&train=K&eval=M]`: run NAME's curves
//!   ([`crate::runs::RunCurves`]); with what the client holds, only the points after it (unless they changed).
//!
//! Each request reads what was appended since the previous one (the page polls every second). File work
//! runs on tokio's blocking pool under one lock, bounded per request by [`crate::ReadLimits`].

use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::DashboardError;
use crate::runs::{Have, Runs};

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const STYLE_CSS: &str = include_str!("../assets/style.css");

type Shared = Arc<Mutex<Runs>>;

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

fn json(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body).into_response()
}

fn error(e: DashboardError) -> Response {
    let status = match e {
        DashboardError::NoSuchRun => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json(status, serde_json::to_vec(&serde_json::json!({ "error": e.to_string() })).expect("json"))
}

/// Runs `f` on the runs under the lock, off the async threads (it reads files).
async fn with_runs(
    runs: Shared,
    f: impl FnOnce(&mut Runs) -> Result<Vec<u8>, DashboardError> + Send + 'static,
) -> Response {
    let result = tokio::task::spawn_blocking(move || {
        let mut runs = runs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut runs)
    })
    .await;
    match result {
        Ok(Ok(body)) => json(StatusCode::OK, body),
        Ok(Err(e)) => error(e),
        Err(e) => error(DashboardError::Internal(e.to_string())),
    }
}

async fn list(State(runs): State<Shared>) -> Response {
    with_runs(runs, |runs| {
        let list = runs.summaries()?;
        let body = serde_json::json!({ "root": runs.root().display().to_string(), "runs": list });
        Ok(serde_json::to_vec(&body).expect("json"))
    })
    .await
}

async fn metrics(State(runs): State<Shared>, Path(name): Path<String>, uri: Uri) -> Response {
    let have = Have::from_query(uri.query());
    with_runs(runs, move |runs| runs.curves(&name, have, |c| serde_json::to_vec(c).expect("json"))).await
}

async fn not_found() -> Response {
    error(DashboardError::NoSuchRun)
}

/// The dashboard's routes over `runs`.
pub fn router(runs: Runs) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
        .route("/api/runs", get(list))
        .route("/api/runs/{name}/metrics", get(metrics))
        .fallback(not_found)
        .with_state(Arc::new(Mutex::new(runs)))
}

/// Binds `host:port` (port 0: any free one). Binding first, before serving, makes "address in use" an error
/// the caller sees at once.
pub fn bind(host: &str, port: u16) -> Result<TcpListener, DashboardError> {
    TcpListener::bind((host, port)).map_err(|source| DashboardError::Bind { addr: format!("{host}:{port}"), source })
}

/// Serves the dashboard on `listener` until the process ends (on a small tokio runtime of its own).
pub fn serve(listener: TcpListener, runs: Runs) -> Result<(), DashboardError> {
    let io = |source| DashboardError::Serve(source);
    listener.set_nonblocking(true).map_err(io)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().map_err(io)?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(io)?;
        axum::serve(listener, router(runs)).await.map_err(io)
    })
}

/// [`serve`] on a background thread (for `qlora train --dashboard` and tests).
pub fn spawn(listener: TcpListener, runs: Runs) -> std::thread::JoinHandle<Result<(), DashboardError>> {
    std::thread::Builder::new()
        .name("dashboard".into())
        .spawn(move || serve(listener, runs))
        .expect("spawning the dashboard thread")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runs::ReadLimits;
    use std::io::{Read, Write};

    /// A plain HTTP/1.1 GET of a raw request target: (status, body).
    pub(crate) fn get(addr: std::net::SocketAddr, target: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }

    #[test]
    fn serves_the_page_and_the_api_and_refuses_paths_out_of_the_runs_directory() {
        let root = tempfile::tempdir().unwrap();
        let runs_dir = root.path().join("runs");
        for (name, loss) in [("a run", 1.5), ("sibling", 9.0)] {
            let dir = if name == "sibling" { root.path().join(name) } else { runs_dir.join(name) };
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("metrics.jsonl"),
                format!("{{\"kind\":\"train\",\"step\":7,\"loss\":{loss}}}\nnot json\n"),
            )
            .unwrap();
        }
        let listener = bind("127.0.0.1", 0).unwrap();
        let addr = listener.local_addr().unwrap();
        spawn(listener, Runs::new(&runs_dir, ReadLimits::default()));

        let (status, page) = get(addr, "/");
        assert_eq!(status, 200);
        assert!(page.contains("<script src=\"app.js\"") && !page.contains("http://") && !page.contains("https://"));
        assert_eq!(get(addr, "/app.js").0, 200);
        let (status, body) = get(addr, "/api/runs");
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["runs"].as_array().unwrap().len(), 1);
        assert_eq!(v["runs"][0]["name"], "a run");
        assert_eq!(v["runs"][0]["step"], 7);
        assert_eq!(v["runs"][0]["counts"]["malformed"], 1);
        let (status, body) = get(addr, "/api/runs/a%20run/metrics");
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((v["full"].as_bool(), v["train"][0]["loss"].as_f64()), (Some(true), Some(1.5)));
        for bad in [
            "/api/runs/../metrics",
            "/api/runs/..%2Fsibling/metrics",
            "/api/runs/%2E%2E%2Fsibling/metrics",
            "/api/runs/..%5Csibling/metrics",
            "/api/runs/sibling/metrics",
            "/api/runs/%2E%2E/metrics",
            "/api/runs/a%20run/../../sibling/metrics",
            "/../sibling/metrics.jsonl",
            "/api/runs/a%20run/metrics.jsonl",
            "/api/runs/%00/metrics",
        ] {
            let (status, body) = get(addr, bad);
            assert_eq!(status, 404, "{bad}: {body}");
            assert!(!body.contains("9.0"), "{bad}: {body}");
        }
    }
}
