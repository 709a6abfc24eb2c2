//! What several modules share: `qlora serve` started on a free loopback port and stopped when dropped; the
//! official `openai` Python client in a venv.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running `qlora serve`, killed when dropped.
pub struct Server(pub Child);

impl Server {
    /// Stops the server now (what a test does to prove that a later step never reaches it).
    pub fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `qlora serve --port 0 ARGS...`: the server and its base URL (`http://127.0.0.1:PORT`) once it listens.
/// Its stderr is echoed with a `[serve]` prefix.
pub fn start_serve(args: &[OsString]) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["serve", "--port", "0"])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[serve] {line}");
            if let Some(addr) = line.split("listening on ").nth(1) {
                let _ = tx.send(addr.trim_end_matches(')').to_string());
            }
        }
    });
    let server = Server(child);
    let addr = rx.recv_timeout(Duration::from_secs(300)).expect("qlora serve printed its address");
    assert!(addr.starts_with("127.0.0.1:"), "binds loopback by default: {addr}");
    (server, format!("http://{addr}"))
}

/// The `openai` package the client tests pin.
const OPENAI: &str = "openai==3.57.0";

/// A venv with the pinned `openai` package: its python.
pub fn openai_python() -> PathBuf {
    let venv = formats::source::cache_dir().join("openai-venv");
    let python = venv.join("bin/python");
    let has_openai = |python: &Path| {
        Command::new(python)
            .args(["-c", &format!("import openai, sys; sys.exit(openai.__version__ != '{}')", &OPENAI[8..])])
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_openai(&python) {
        return python;
    }
    std::fs::create_dir_all(venv.parent().unwrap()).unwrap();
    let status = Command::new("python3").args(["-m", "venv"]).arg(&venv).status();
    assert!(
        status.as_ref().is_ok_and(|s| s.success()),
        "this test needs `python3 -m venv` (Debian: apt-get install python3-venv) to install the openai client: {status:?}"
    );
    let status = Command::new(&python).args(["-m", "pip", "install", "-q", OPENAI]).status();
    assert!(
        status.as_ref().is_ok_and(|s| s.success()),
        "pip could not install {OPENAI} from PyPI into {}: {status:?}",
        venv.display()
    );
    assert!(has_openai(&python), "{OPENAI} installed but does not import");
    python
}

/// `qlora generate ARGS --max-new-tokens MAX --prompt PROMPT [--adapter DIR]`, greedy: the printed text.
pub fn generate_greedy(args: &[OsString], prompt: &str, adapter: Option<&Path>, max: usize) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qlora"));
    cmd.arg("generate").args(args).args(["--max-new-tokens", &max.to_string(), "--prompt", prompt]);
    if let Some(dir) = adapter {
        cmd.arg("--adapter").arg(dir);
    }
    let output = cmd.output().unwrap();
    assert!(output.status.success(), "qlora generate: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    text.strip_suffix('\n').expect("generate ends with a newline").to_string()
}
