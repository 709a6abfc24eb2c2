//! The dashboard page in a real browser: headless Chromium, driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: no WebSocket client needed), follows a run that is still being written. Needs
//! Chromium: Debian's `chromium` (`.ci/run` installs it), or the browser named by `QLORA_CHROMIUM`.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dashboard::status::{RunState, StatusFile};
use dashboard::{ReadLimits, Runs};
use serde_json::{Value, json};

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
        let tail: String =
            log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
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
        // Ask it to close (its helper processes go with it), then make sure.
        let _ = self.to_browser.write_all(b"{\"id\":0,\"method\":\"Browser.close\"}\0");
        let _ = self.to_browser.flush();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------- the page ----------

/// What the page shows of run `name`: its row's step and loss cells, its status, and the number of lines drawn
/// in the training-loss chart (null until the row is there).
fn row_expr(name: &str) -> String {
    format!(
        "(() => {{ const r = [...document.querySelectorAll('tr.run')].find(t => t.dataset.run === {name}); \
         return r ? {{ step: r.querySelector('.step').textContent, loss: r.querySelector('.loss').textContent, \
         status: r.querySelector('.badge').textContent, \
         lines: document.querySelectorAll('#chart-loss polyline').length }} : null; }})()",
        name = serde_json::to_string(name).unwrap()
    )
}

/// A `metrics.jsonl` training line as `qlora train` writes it (`train::metrics::MetricsLog`), on plausible
/// curves.
fn train_line(step: u64, total: u64, loss_shift: f64) -> String {
    let t = step as f64;
    let v = json!({
        "step": step,
        "loss": 2.6 * (-t / 18.0).exp() + 0.9 + 0.08 * (t * 1.7).sin() + loss_shift * (1.0 - (-t / 10.0).exp()),
        "lr": 2e-4 * (t / 3.0).min(1.0),
        "grad_norm": 0.9 * (-t / 25.0).exp() + 0.2 + 0.05 * (t * 0.9).cos(),
        "tokens_per_s": 780.0 + 25.0 * (t * 0.6).sin(),
        "target_tokens": 900,
        "step_seconds": 4.2,
        "peak_rss_mib": 2400.0 + 350.0 * (1.0 - (-t / 4.0).exp()),
        "paged_in_bytes": if step.is_multiple_of(5) { 3u64 << 20 } else { 0 },
        "paged_out_bytes": if step.is_multiple_of(5) { 2u64 << 20 } else { 0 },
        "optimizer_state_bytes": 37_748_736u64,
        "epoch": t / total as f64,
        "kind": "train",
    });
    format!("{v}\n")
}

fn eval_line(step: u64, loss: f64) -> String {
    format!("{}\n", json!({"kind": "eval", "step": step, "eval_loss": loss, "eval_perplexity": loss.exp()}))
}

fn config_toml(max_steps: u64, lr: f64) -> String {
    format!(
        "model = \"smollm2\"\nquant = \"nf4\"\ncompute_dtype = \"f32\"\nlora_r = 64\nlora_alpha = 16.0\n\
         data = \"wordnet\"\nmicro_batch_size = 1\ngrad_accum = 16\nmax_steps = {max_steps}\nlr = {lr:e}\n\
         schedule = \"constant\"\noptimizer = \"paged_adamw_32bit\"\neval_steps = 10\n"
    )
}

/// The last complete line of `metrics.jsonl`, as JSON.
fn last_line(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    let complete = &text[..text.rfind('\n').unwrap()];
    serde_json::from_str(complete.lines().last().unwrap()).unwrap()
}

fn append(path: &Path, bytes: &[u8]) {
    std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap().write_all(bytes).unwrap();
}

/// The page over a run that is still being written: the row shows the file's last complete line (not the
/// half-written one after it); completing that line, a resume that rewrites the file, a run directory made
/// later and one deleted all show without reloading. A screenshot of the page goes to the target directory
/// (`QLORA_DASHBOARD_SCREENSHOT=FILE` writes it there too: docs/images/dashboard.png is made so).
#[test]
fn the_page_in_a_real_browser_follows_a_run_being_written() {
    let runs = tempfile::tempdir().unwrap();
    let (live, total) = ("smollm2-wordnet", 60);
    // A finished run to compare with.
    let done = runs.path().join("smollm2-wordnet-lr1e-4");
    std::fs::create_dir(&done).unwrap();
    std::fs::write(done.join("train_config.toml"), config_toml(30, 1e-4)).unwrap();
    let mut text = String::new();
    for step in 1..=30 {
        text += &train_line(step, 30, 0.25);
        if step % 10 == 0 {
            text += &eval_line(step, 1.35 + 1.2 * (-(step as f64) / 12.0).exp());
        }
    }
    std::fs::write(done.join("metrics.jsonl"), text).unwrap();
    StatusFile::running(Some(30)).with_state(RunState::Finished, None).write(&done).unwrap();

    // The live run: 40 steps written, and the first bytes of step 41.
    let dir = runs.path().join(live);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("train_config.toml"), config_toml(total, 2e-4)).unwrap();
    StatusFile::running(Some(total)).write(&dir).unwrap();
    let metrics = dir.join("metrics.jsonl");
    for step in 1..=40 {
        append(&metrics, train_line(step, total, 0.0).as_bytes());
        // Evals every 10 steps; the last one (step 40) comes later, so the last line is a training line.
        if step % 10 == 0 && step < 40 {
            append(&metrics, eval_line(step, 1.2 + 1.3 * (-(step as f64) / 12.0).exp()).as_bytes());
        }
    }
    let line41 = train_line(41, total, 0.0);
    let (head, rest) = line41.split_at(40);
    append(&metrics, head.as_bytes());

    let listener = dashboard::bind("127.0.0.1", 0).unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    dashboard::spawn(listener, Runs::new(runs.path(), ReadLimits::default()));
    let (width, height) = (1400, 980);
    let mut browser = Browser::launch(width, height);
    browser.open(&format!("http://{addr}/"), width, height);

    let expr = row_expr(live);
    let shows = |step: u64, loss: f64| {
        move |v: &Value| {
            v["step"].as_str() == Some(step.to_string().as_str())
                && v["loss"].as_str() == Some(format!("{loss:.4}").as_str())
        }
    };
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

    // A resume from step 38 rewrites the file through a rename (as the trainer does: the lines up to its
    // checkpoint) and goes on.
    let kept: String = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["step"].as_u64().unwrap() <= 38))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.join(".metrics.jsonl.partial"), kept).unwrap();
    std::fs::rename(dir.join(".metrics.jsonl.partial"), &metrics).unwrap();
    for step in 39..=44 {
        append(&metrics, train_line(step, total, 0.0).as_bytes());
    }
    let last = last_line(&metrics);
    let (_, took) = browser.wait_for("step 44 after a resume", &expr, shows(44, last["loss"].as_f64().unwrap()));
    println!("  the resumed run showed after {took:.2?}");
    let steps = browser.eval(
        "(() => { const c = state.curves.get('smollm2-wordnet'); \
         return c.train.map(p => p.step).concat(c.trainTail ? [c.trainTail.step] : []); })()",
    );
    let steps: Vec<u64> = steps.as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=44).collect::<Vec<_>>(), "one run, each step once");

    // A run directory made later shows up; deleted, it goes.
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
