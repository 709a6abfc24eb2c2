//! The training dashboard end to end: the real trainer's files read through the JSON API while it trains,
//! and the page in a real browser (headless Chromium driven over the DevTools protocol on a pipe) following a
//! run that is still being written. Needs Chromium: Debian's `chromium` (`.ci/run` installs it), or the
//! browser named by `QLORA_CHROMIUM`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dashboard::status::{RunState, StatusFile};
use dashboard::{ReadLimits, Runs};
use qlora_tests::{fixtures_dir, rng_lock};
use serde_json::{Value, json};
use train::config::TrainConfig;
use train::metrics::{MetricsLog, StepMetrics};
use train::trainer::{self, Progress, Quiet};

/// `GET target` over plain HTTP/1.1: (status, body).
fn http_get(addr: SocketAddr, target: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

fn api_run(addr: SocketAddr, name: &str) -> Value {
    let (status, body) = http_get(addr, "/api/runs");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["runs"].as_array().unwrap().iter().find(|r| r["name"] == name).cloned().unwrap_or(Value::Null)
}

fn tiny_config(out: &Path) -> TrainConfig {
    let tiny = fixtures_dir().join("tiny-train");
    TrainConfig {
        model: tiny.join("model-nf4").display().to_string(),
        data: tiny.join("chat-train.jsonl").display().to_string(),
        output_dir: out.to_path_buf(),
        lora_r: 8,
        micro_batch_size: 2,
        grad_accum: 1,
        max_steps: 3,
        eval_steps: 0,
        save_steps: 0,
        sample_prompt: String::new(),
        ..TrainConfig::default()
    }
}

/// Asks the dashboard about the run from inside the training loop, after each step.
struct Watch {
    addr: SocketAddr,
    name: String,
    seen: Vec<Value>,
}

impl Progress for Watch {
    fn start(&mut self, _: u64, _: u64) {}
    fn step(&mut self, m: &StepMetrics) {
        let run = api_run(self.addr, &self.name);
        assert_eq!(run["step"], m.step, "the dashboard shows the step just written: {run}");
        assert_eq!(run["last_train"]["loss"].as_f64(), Some(m.loss));
        self.seen.push(run);
    }
    fn message(&mut self, _: &str) {}
    fn finish(&mut self) {}
}

/// The trainer's files through the API while it trains: running with its step, total and ETA; then finished.
/// A run that fails says stopped, with the error.
#[test]
fn the_api_follows_a_real_training_run() {
    let _rng = rng_lock();
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("tiny run");
    let listener = dashboard::bind("127.0.0.1", 0).unwrap();
    let addr = listener.local_addr().unwrap();
    dashboard::spawn(listener, Runs::single(&out, ReadLimits::default()).unwrap());

    let config = tiny_config(&out);
    let mut watch = Watch { addr, name: "tiny run".into(), seen: Vec::new() };
    let summary = trainer::train(&config, None, &mut watch).unwrap();
    assert_eq!(watch.seen.len(), 3);
    for run in &watch.seen {
        assert_eq!(run["status"]["state"], "running", "{run}");
        assert_eq!(run["total_steps"], 3);
        assert!(run["eta_seconds"].as_f64().is_some(), "{run}");
        assert_eq!(run["model"].as_str(), Some(config.model.as_str()));
    }
    let done = api_run(addr, "tiny run");
    assert_eq!(done["status"]["state"], "finished", "{done}");
    assert_eq!((done["step"].as_u64(), done["eta_seconds"].as_f64()), (Some(3), None));
    assert_eq!(done["last_train"]["loss"].as_f64(), summary.losses.last().copied());
    assert_eq!(done["counts"]["malformed"], 0);
    let (status, body) = http_get(addr, "/api/runs/tiny%20run/metrics");
    assert_eq!(status, 200);
    let curves: Value = serde_json::from_str(&body).unwrap();
    let losses: Vec<f64> = curves["train"]
        .as_array()
        .unwrap()
        .iter()
        .chain(curves["train_tail"].as_object().map(|_| &curves["train_tail"]))
        .map(|p| p["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses, summary.losses);

    // A run that cannot read its data stops, and says why.
    let bad = root.path().join("bad");
    let config = TrainConfig { data: "/nonexistent/data.jsonl".into(), ..tiny_config(&bad) };
    assert!(trainer::train(&config, None, &mut Quiet).is_err());
    let status = StatusFile::read(&bad).unwrap().unwrap();
    assert_eq!(status.state, RunState::Stopped);
    assert!(status.message.as_deref().unwrap_or("").contains("/nonexistent/data.jsonl"), "{status:?}");
}

// ---------- a headless browser over the DevTools protocol (`--remote-debugging-pipe`) ----------

fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("QLORA_CHROMIUM") {
        return path.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"] {
        if let Some(found) = std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()) {
            return found;
        }
    }
    panic!("this test needs headless Chromium: `apt-get install chromium` (.ci/run installs it) or QLORA_CHROMIUM");
}

struct Browser {
    child: Child,
    to_browser: ChildStdin,
    from_browser: mpsc::Receiver<Value>,
    next_id: u64,
    session: Option<String>,
    log: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn launch(width: u32, height: u32) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let log = profile.path().join("chromium.log");
        // The protocol runs over fds 3 (to the browser) and 4 (from it): the shell maps them onto our pipes.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >&2"#)
            .arg(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--mute-audio",
                "--remote-debugging-pipe",
                &format!("--window-size={width},{height}"),
                &format!("--user-data-dir={}", profile.path().join("profile").display()),
                "about:blank",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting chromium");
        let to_browser = child.stdin.take().unwrap();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let (tx, from_browser) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            while reader.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                buf.pop_if(|b| *b == 0);
                if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                    && tx.send(v).is_err()
                {
                    break;
                }
                buf.clear();
            }
        });
        Browser { child, to_browser, from_browser, next_id: 0, session: None, log, _profile: profile }
    }

    fn fail(&self, what: String) -> ! {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: String = log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        panic!("{what}\n--- chromium log (last lines) ---\n{tail}");
    }

    /// Sends one command (to the attached page, once there is one) and waits for its answer.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = s.clone().into();
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        if let Err(e) = self.to_browser.write_all(&bytes).and_then(|_| self.to_browser.flush()) {
            self.fail(format!("{method}: writing to chromium: {e}"));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from_browser.recv_timeout(left) {
                Ok(v) if v["id"] == id => {
                    if let Some(e) = v.get("error") {
                        self.fail(format!("{method}: {e}"));
                    }
                    return v["result"].clone();
                }
                Ok(_) => {} // an event
                Err(e) => self.fail(format!("{method}: no answer from chromium ({e})")),
            }
        }
    }

    /// Opens a page and attaches to it.
    fn open(&mut self, url: &str, width: u32, height: u32) {
        let target = self.call("Target.createTarget", json!({"url": "about:blank"}));
        let attached =
            self.call("Target.attachToTarget", json!({"targetId": target["targetId"].clone(), "flatten": true}));
        self.session = Some(attached["sessionId"].as_str().unwrap().to_string());
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        self.call("Page.navigate", json!({"url": url}));
    }

    /// Evaluates `expression` in the page; its value as JSON.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true}));
        if let Some(e) = r.get("exceptionDetails") {
            self.fail(format!("{expression}: {e}"));
        }
        r["result"]["value"].clone()
    }

    /// Evaluates `expression` until `done` holds for its value (within 30 s); returns it and the time taken.
    fn wait_for(&mut self, what: &str, expression: &str, done: impl Fn(&Value) -> bool) -> (Value, Duration) {
        let started = Instant::now();
        loop {
            let v = self.eval(expression);
            if done(&v) {
                return (v, started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(30) {
                self.fail(format!("waited 30 s for {what}; the page shows {v}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn screenshot(&mut self) -> Vec<u8> {
        use base64::Engine;
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------- the page ----------

/// What the page shows of run `name`: its row's step and loss cells, and the number of lines drawn in the
/// training-loss chart (null until the row is there).
fn row_expr(name: &str) -> String {
    format!(
        "(() => {{ const r = [...document.querySelectorAll('tr.run')].find(t => t.dataset.run === {name}); \
         return r ? {{ step: r.querySelector('.step').textContent, loss: r.querySelector('.loss').textContent, \
         status: r.querySelector('.badge').textContent, lines: document.querySelectorAll('#chart-loss polyline').length }} \
         : null; }})()",
        name = serde_json::to_string(name).unwrap()
    )
}

fn step_metrics(step: u64, total: u64) -> StepMetrics {
    let t = step as f64;
    StepMetrics {
        step,
        loss: 2.6 * (-t / 18.0).exp() + 0.9 + 0.08 * (t * 1.7).sin(),
        lr: 2e-4 * (t / 3.0).min(1.0),
        grad_norm: 0.9 * (-t / 25.0).exp() + 0.2 + 0.05 * (t * 0.9).cos(),
        tokens_per_s: 780.0 + 25.0 * (t * 0.6).sin(),
        target_tokens: 900,
        step_seconds: 4.2,
        peak_rss_mib: 2400.0 + 350.0 * (1.0 - (-t / 4.0).exp()),
        paged_in_bytes: if step % 5 == 0 { 3 << 20 } else { 0 },
        paged_out_bytes: if step % 5 == 0 { 2 << 20 } else { 0 },
        optimizer_state_bytes: 37_748_736,
        epoch: t / total as f64,
    }
}

/// The last complete line of `metrics.jsonl`, as JSON.
fn last_line(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    let complete = &text[..text.rfind('\n').unwrap()];
    serde_json::from_str(complete.lines().last().unwrap()).unwrap()
}

fn append(path: &Path, bytes: &[u8]) {
    std::fs::OpenOptions::new().append(true).open(path).unwrap().write_all(bytes).unwrap();
}

/// The page over a run that is still being written: the row shows the file's last complete line (not the
/// half-written one after it); completing that line, a resume that rewrites the file, and a run directory
/// made later all show up without reloading; a screenshot of the page goes to the target directory
/// (`QLORA_DASHBOARD_SCREENSHOT=FILE` writes it there too: docs/images/dashboard.png is made so).
#[test]
fn the_page_in_a_real_browser_follows_a_run_being_written() {
    let runs = tempfile::tempdir().unwrap();
    let (live, total) = ("smollm2-wordnet", 60);
    // A finished run to compare with.
    let done = runs.path().join("smollm2-wordnet-lr1e-4");
    std::fs::create_dir(&done).unwrap();
    let config = TrainConfig { lr: 1e-4, max_steps: 30, output_dir: done.clone(), ..TrainConfig::default() };
    std::fs::write(done.join("train_config.toml"), config.to_toml()).unwrap();
    let mut log = MetricsLog::open(&done.join("metrics.jsonl"), 0).unwrap();
    for step in 1..=30 {
        let mut m = step_metrics(step, 30);
        m.loss += 0.25 * (1.0 - (-(step as f64) / 10.0).exp());
        log.step(&m).unwrap();
        if step % 10 == 0 {
            log.eval(step, m.loss + 0.15).unwrap();
        }
    }
    StatusFile::running(Some(30)).with_state(RunState::Finished, None).write(&done).unwrap();

    // The live run: 40 steps written, and the first bytes of step 41.
    let dir = runs.path().join(live);
    std::fs::create_dir(&dir).unwrap();
    let config = TrainConfig { max_steps: total, eval_steps: 10, output_dir: dir.clone(), ..TrainConfig::default() };
    std::fs::write(dir.join("train_config.toml"), config.to_toml()).unwrap();
    StatusFile::running(Some(total)).write(&dir).unwrap();
    let metrics = dir.join("metrics.jsonl");
    let mut log = MetricsLog::open(&metrics, 0).unwrap();
    for step in 1..=40 {
        log.step(&step_metrics(step, total)).unwrap();
        if step % 10 == 0 {
            log.eval(step, step_metrics(step, total).loss + 0.12).unwrap();
        }
    }
    drop(log);
    let mut line41 = serde_json::to_value(step_metrics(41, total)).unwrap();
    line41["kind"] = "train".into();
    let line41 = format!("{line41}\n");
    let (head, rest) = line41.split_at(40);
    append(&metrics, head.as_bytes());

    let listener = dashboard::bind("127.0.0.1", 0).unwrap();
    let addr = listener.local_addr().unwrap();
    dashboard::spawn(listener, Runs::new(runs.path(), ReadLimits::default()));
    let (width, height) = (1400, 980);
    let mut browser = Browser::launch(width, height);
    browser.open(&format!("http://{addr}/"), width, height);

    let expr = row_expr(live);
    let shows = |step: u64, loss: f64| move |v: &Value| v["step"] == step.to_string() && v["loss"] == format!("{loss:.4}");
    let last = last_line(&metrics);
    assert_eq!(last["step"], 40, "the half-written line is not a line yet");
    let (v, _) = browser.wait_for("the row of the live run", &expr, |v| !v.is_null());
    println!("  first view: {v}");
    let (v, _) = browser.wait_for("step 40", &expr, shows(40, last["loss"].as_f64().unwrap()));
    assert_eq!(v["status"], "running");

    // The writer finishes the line: it appears without a reload.
    append(&metrics, rest.as_bytes());
    let last = last_line(&metrics);
    assert_eq!(last["step"], 41);
    let (_, took) = browser.wait_for("step 41", &expr, shows(41, last["loss"].as_f64().unwrap()));
    println!("  an appended line showed after {took:.2?}");

    // A resume from step 38 rewrites the file (MetricsLog keeps the lines up to the checkpoint) and goes on.
    let mut log = MetricsLog::open(&metrics, 38).unwrap();
    for step in 39..=44 {
        log.step(&step_metrics(step, total)).unwrap();
    }
    let last = last_line(&metrics);
    let (_, took) = browser.wait_for("step 44 after a resume", &expr, shows(44, last["loss"].as_f64().unwrap()));
    println!("  the resumed run showed after {took:.2?}");
    let steps = browser.eval(
        "(() => { const c = state.curves.get('smollm2-wordnet'); return c.train.map(p => p.step).concat(c.trainTail ? [c.trainTail.step] : []); })()",
    );
    let steps: Vec<u64> = steps.as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=44).collect::<Vec<_>>(), "one run, each step once");

    // A run directory made later shows up.
    let late = runs.path().join("late run #2");
    std::fs::create_dir(&late).unwrap();
    std::fs::write(late.join("metrics.jsonl"), "{\"kind\":\"train\",\"step\":1,\"loss\":3.5}\n").unwrap();
    browser.wait_for("the later run", &row_expr("late run #2"), |v| v["step"] == "1" && v["loss"] == "3.5000");
    std::fs::remove_dir_all(&late).unwrap();
    browser.wait_for("the deleted run to go", &row_expr("late run #2"), Value::is_null);

    // Both runs drawn (raw + smoothed each), then the screenshot.
    browser.eval("document.querySelector('tr.run[data-run=\"smollm2-wordnet-lr1e-4\"] input').click()");
    browser.wait_for("both runs' loss curves", &expr, |v| v["lines"] == 4);
    let png = browser.screenshot();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), width, "IHDR width");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&out, &png).unwrap();
    println!("  screenshot: {} ({} bytes)", out.display(), png.len());
    if let Some(docs) = std::env::var_os("QLORA_DASHBOARD_SCREENSHOT") {
        std::fs::write(&docs, &png).unwrap();
    }
}
