//! Incremental reading of a file that another process appends to: each [`TailReader::poll`] reads only the
//! bytes added since the last one (at most a byte budget per call), hands out the complete lines, keeps a
//! half-written last line until its newline arrives, and notices when the file was truncated, replaced
//! (a resumed run rewrites `metrics.jsonl` through a rename) or deleted, so that the reader starts over.
//! Memory stays bounded whatever the file holds: one read chunk plus at most `max_line` bytes of a pending
//! line; a longer line is dropped (and reported) without being buffered.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Bytes read per `read` call.
const CHUNK: usize = 64 << 10;
/// How many leading bytes are kept to recognise the same file on the next poll.
const HEAD: usize = 256;

/// What a poll found, in file order.
#[derive(Debug, PartialEq, Eq)]
pub enum TailEvent<'a> {
    /// The file was truncated, replaced or deleted: everything read before is void; lines follow from its start.
    Reset,
    /// A complete line, without its `\n`.
    Line(&'a [u8]),
    /// A line longer than `max_line` bytes, skipped.
    Overlong,
}

/// What a poll did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PollReport {
    /// Whether the file exists.
    pub exists: bool,
    /// Its length when polled.
    pub file_bytes: u64,
    /// Bytes consumed so far (lines handed out plus the pending partial line).
    pub offset: u64,
    /// Bytes read by this poll.
    pub read_bytes: u64,
    /// Bytes of a line still waiting for its newline.
    pub pending_bytes: u64,
}

impl PollReport {
    /// Whether every byte of the file has been read (a pending partial line counts as read).
    pub fn caught_up(&self) -> bool {
        self.offset >= self.file_bytes
    }
}

/// Reads the lines appended to one file, poll by poll.
#[derive(Debug)]
pub struct TailReader {
    path: PathBuf,
    max_line: usize,
    offset: u64,
    partial: Vec<u8>,
    /// Inside a line that outgrew `max_line`: drop bytes until its newline.
    overlong: bool,
    identity: Option<(u64, u64)>,
    head: Vec<u8>,
}

#[cfg(unix)]
fn identity(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn identity(_: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

impl TailReader {
    /// A reader of `path` (which need not exist yet) that skips lines longer than `max_line` bytes.
    pub fn new(path: impl Into<PathBuf>, max_line: usize) -> Self {
        TailReader {
            path: path.into(),
            max_line: max_line.max(1),
            offset: 0,
            partial: Vec::new(),
            overlong: false,
            identity: None,
            head: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes held for a pending line (bounded by `max_line`).
    pub fn buffered_bytes(&self) -> usize {
        self.partial.len()
    }

    fn started(&self) -> bool {
        self.offset > 0 || self.identity.is_some()
    }

    fn restart(&mut self) {
        self.offset = 0;
        self.partial = Vec::new();
        self.overlong = false;
        self.identity = None;
        self.head.clear();
    }

    /// Whether the open file is not the one read so far (or was cut shorter than what was read).
    fn replaced(&self, file: &mut File, meta: &std::fs::Metadata) -> io::Result<bool> {
        if meta.len() < self.offset {
            return Ok(true);
        }
        if let (Some(old), Some(new)) = (self.identity, identity(meta))
            && old != new
        {
            return Ok(true);
        }
        if self.head.is_empty() {
            return Ok(false);
        }
        let mut head = vec![0u8; self.head.len()];
        file.seek(SeekFrom::Start(0))?;
        file.read_exact(&mut head)?;
        Ok(head != self.head)
    }

    /// Reads at most `budget` new bytes and calls `on` for what they hold (a [`TailEvent::Reset`] first when
    /// the file is not the one read before). A missing file is not an error: it reads as empty.
    pub fn poll(&mut self, budget: u64, on: &mut dyn FnMut(TailEvent<'_>)) -> io::Result<PollReport> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if self.started() {
                    self.restart();
                    on(TailEvent::Reset);
                }
                return Ok(PollReport::default());
            }
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        if self.started() && self.replaced(&mut file, &meta)? {
            self.restart();
            on(TailEvent::Reset);
        }
        self.identity = identity(&meta).or(Some((0, 0)));
        let len = meta.len();
        let want = len.saturating_sub(self.offset).min(budget);
        file.seek(SeekFrom::Start(self.offset))?;
        let mut chunk = vec![0u8; CHUNK.min(want as usize).max(1)];
        let mut read = 0u64;
        while read < want {
            let n = ((want - read) as usize).min(chunk.len());
            let got = file.read(&mut chunk[..n])?;
            if got == 0 {
                break; // truncated while reading: the next poll sees it
            }
            let bytes = &chunk[..got];
            if self.head.len() < HEAD && self.offset < HEAD as u64 {
                let take = (HEAD - self.head.len()).min(got);
                self.head.extend_from_slice(&bytes[..take]);
            }
            self.feed(bytes, on);
            self.offset += got as u64;
            read += got as u64;
        }
        Ok(PollReport {
            exists: true,
            file_bytes: len,
            offset: self.offset,
            read_bytes: read,
            pending_bytes: self.partial.len() as u64,
        })
    }

    fn feed(&mut self, mut bytes: &[u8], on: &mut dyn FnMut(TailEvent<'_>)) {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            let (line, rest) = (&bytes[..nl], &bytes[nl + 1..]);
            if self.overlong {
                self.overlong = false;
                on(TailEvent::Overlong);
            } else if self.partial.len() + line.len() > self.max_line {
                self.partial = Vec::new();
                on(TailEvent::Overlong);
            } else if self.partial.is_empty() {
                on(TailEvent::Line(line));
            } else {
                self.partial.extend_from_slice(line);
                on(TailEvent::Line(&self.partial));
                self.partial.clear();
            }
            bytes = rest;
        }
        if self.overlong {
            return;
        }
        if self.partial.len() + bytes.len() > self.max_line {
            self.partial = Vec::new();
            self.overlong = true;
        } else {
            self.partial.extend_from_slice(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Polls once with a budget and returns what came out, as text.
    fn poll(r: &mut TailReader, budget: u64) -> (Vec<String>, PollReport) {
        let mut out = Vec::new();
        let report = r
            .poll(budget, &mut |e| {
                out.push(match e {
                    TailEvent::Reset => "<reset>".to_string(),
                    TailEvent::Line(l) => String::from_utf8_lossy(l).into_owned(),
                    TailEvent::Overlong => "<overlong>".to_string(),
                })
            })
            .unwrap();
        (out, report)
    }

    fn append(path: &Path, bytes: &[u8]) {
        std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap().write_all(bytes).unwrap();
    }

    #[test]
    fn hands_out_complete_lines_and_keeps_a_half_written_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let mut r = TailReader::new(&path, 1024);
        assert_eq!(poll(&mut r, u64::MAX), (vec![], PollReport::default()), "a missing file reads as empty");
        append(&path, b"one\ntwo\nthr");
        let (lines, report) = poll(&mut r, u64::MAX);
        assert_eq!(lines, ["one", "two"]);
        assert_eq!((report.offset, report.pending_bytes, report.caught_up()), (11, 3, true));
        assert_eq!(poll(&mut r, u64::MAX).0, Vec::<String>::new(), "nothing new");
        append(&path, b"ee");
        assert_eq!(poll(&mut r, u64::MAX).0, Vec::<String>::new(), "still no newline");
        append(&path, b"\n\nfour\n");
        assert_eq!(poll(&mut r, u64::MAX).0, ["three", "", "four"]);
    }

    #[test]
    fn reads_at_most_the_budget_per_poll() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        append(&path, b"aaaa\nbbbb\ncccc\n");
        let mut r = TailReader::new(&path, 1024);
        let (lines, report) = poll(&mut r, 7);
        assert_eq!((lines, report.read_bytes, report.caught_up()), (vec!["aaaa".to_string()], 7, false));
        assert_eq!(poll(&mut r, 7).0, ["bbbb"]);
        let (lines, report) = poll(&mut r, 7);
        assert_eq!((lines, report.caught_up()), (vec!["cccc".to_string()], true));
    }

    #[test]
    fn starts_over_on_truncation_replacement_and_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        append(&path, b"1\n2\n3\n");
        let mut r = TailReader::new(&path, 1024);
        assert_eq!(poll(&mut r, u64::MAX).0, ["1", "2", "3"]);
        // Truncated in place and rewritten shorter.
        std::fs::File::create(&path).unwrap().write_all(b"1\n").unwrap();
        assert_eq!(poll(&mut r, u64::MAX).0, ["<reset>", "1"]);
        // Replaced through a rename by a longer file with the same first line (a resumed run's rewrite).
        let tmp = dir.path().join("tmp");
        std::fs::write(&tmp, b"1\n2b\n3b\n4b\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(poll(&mut r, u64::MAX).0, ["<reset>", "1", "2b", "3b", "4b"]);
        // Rewritten in place, as long as before, other content.
        std::fs::write(&path, b"9\n8b\n7b\n6b\n").unwrap();
        assert_eq!(poll(&mut r, u64::MAX).0, ["<reset>", "9", "8b", "7b", "6b"]);
        // Deleted, then written again.
        std::fs::remove_file(&path).unwrap();
        let (lines, report) = poll(&mut r, u64::MAX);
        assert_eq!((lines, report.exists), (vec!["<reset>".to_string()], false));
        assert_eq!(poll(&mut r, u64::MAX).0, Vec::<String>::new(), "reset once");
        append(&path, b"new\n");
        assert_eq!(poll(&mut r, u64::MAX).0, ["new"]);
    }

    #[test]
    fn skips_overlong_lines_without_buffering_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let mut r = TailReader::new(&path, 16);
        append(&path, b"short\n");
        append(&path, &vec![b'x'; 1 << 20]);
        assert_eq!(poll(&mut r, u64::MAX).0, ["short"]);
        assert_eq!(r.buffered_bytes(), 0, "a line past the limit is dropped, not kept");
        append(&path, &vec![b'y'; 1 << 20]);
        assert_eq!(poll(&mut r, u64::MAX).0, Vec::<String>::new());
        assert_eq!(r.buffered_bytes(), 0);
        append(&path, b"tail\nok\n0123456789abcdef\n0123456789abcdefg\n");
        assert_eq!(poll(&mut r, u64::MAX).0, ["<overlong>", "ok", "0123456789abcdef", "<overlong>"]);
        // A line assembled across polls is held to the same limit.
        append(&path, b"0123456789");
        assert_eq!(poll(&mut r, u64::MAX).0, Vec::<String>::new());
        append(&path, b"abcdefgh\nend\n");
        assert_eq!(poll(&mut r, u64::MAX).0, ["<overlong>", "end"]);
    }
}
