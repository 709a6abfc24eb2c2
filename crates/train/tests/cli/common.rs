//! What several modules share: `qlora serve` started on a free loopback port and stopped when dropped.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
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
