//! The judgment cache: one JSON line per judge call, appended and flushed as each answer arrives.
//!
//! The key is the exact request: judge model, system prompt, user message (which holds the question and
//! both answers in the order shown, through the prompt template), temperature and token limit. So a run
//! that is interrupted resumes where it stopped, a re-run asks only what is missing, and changing a
//! prompt, an answer, the order or the judge asks again. No API key is part of a request. A line cut short
//! by a kill (the file does not end in a newline) is dropped when the cache is opened; any other bad line
//! is an error naming it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::JudgeError;
use crate::files::{QuestionId, line_error};
use crate::verdict::Verdict;

/// What is sent to the judge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub model: String,
    pub system: String,
    /// Worked examples sent before `user` as (user, assistant) turns (absent from older cache keys).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<(String, String)>,
    pub user: String,
    pub temperature: f64,
    pub max_tokens: usize,
}

impl Request {
    fn key(&self) -> String {
        serde_json::to_string(self).expect("a request serializes")
    }
}

/// One cached judge call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub question_id: QuestionId,
    /// The system shown first (answer A / Assistant 1) and second.
    pub shown_first: String,
    pub shown_second: String,
    /// The judge prompt's name.
    pub prompt: String,
    /// The judge's reply, as received.
    pub judgment: String,
    /// Pairwise: the verdict read from it (`error` when unreadable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// Scoring: the two scores read from it (null when unreadable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<[f64; 2]>,
    /// Seconds since the Unix epoch when the judgment arrived.
    pub tstamp: f64,
    pub request: Request,
}

/// An open cache file.
pub struct Cache {
    path: PathBuf,
    file: File,
    entries: HashMap<String, Entry>,
    /// Whether opening dropped a line cut short by an interrupted write.
    pub dropped_partial_line: bool,
}

impl Cache {
    /// Opens (or creates) the cache at `path` and loads its entries.
    pub fn open(path: &Path) -> Result<Cache, JudgeError> {
        let mut text = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(JudgeError::io(path)(e)),
        };
        let mut dropped_partial_line = false;
        if !text.is_empty() && !text.ends_with(b"\n") {
            let keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            text.truncate(keep);
            let f = OpenOptions::new().write(true).open(path).map_err(JudgeError::io(path))?;
            f.set_len(keep as u64).map_err(JudgeError::io(path))?;
            dropped_partial_line = true;
        }
        let text = String::from_utf8(text)
            .map_err(|_| JudgeError::File { path: path.to_path_buf(), reason: "not UTF-8".into() })?;
        let mut entries = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let entry: Entry = serde_json::from_str(line)
                .map_err(|e| line_error(path, i + 1, format!("not a cached judgment: {e}")))?;
            entries.insert(entry.request.key(), entry);
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(JudgeError::io(dir))?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(JudgeError::io(path))?;
        Ok(Cache { path: path.to_path_buf(), file, entries, dropped_partial_line })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The cached answer to `request`.
    pub fn get(&self, request: &Request) -> Option<&Entry> {
        self.entries.get(&request.key())
    }

    /// Appends `entry` to the file (one write, flushed) and keeps it.
    pub fn append(&mut self, entry: Entry) -> Result<(), JudgeError> {
        let mut line = serde_json::to_string(&entry).expect("an entry serializes");
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(JudgeError::io(&self.path))?;
        self.file.flush().map_err(JudgeError::io(&self.path))?;
        self.entries.insert(entry.request.key(), entry);
        Ok(())
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(user: &str, judgment: &str) -> Entry {
        Entry {
            question_id: QuestionId::Int(1),
            shown_first: "x".into(),
            shown_second: "y".into(),
            prompt: "pair-v2".into(),
            judgment: judgment.into(),
            verdict: Some(Verdict::A),
            scores: None,
            tstamp: 0.0,
            request: Request {
                examples: Vec::new(),
                model: "judge".into(),
                system: "sys".into(),
                user: user.into(),
                temperature: 0.0,
                max_tokens: 16,
            },
        }
    }

    #[test]
    fn keeps_entries_across_opens_and_keys_on_the_whole_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cache.jsonl");
        let mut cache = Cache::open(&path).unwrap();
        assert!(cache.is_empty());
        cache.append(entry("q a b", "[[A]]")).unwrap();
        cache.append(entry("q b a", "[[B]]")).unwrap();
        drop(cache);
        let cache = Cache::open(&path).unwrap();
        assert_eq!(cache.len(), 2);
        let e = entry("q b a", "");
        assert_eq!(cache.get(&e.request).unwrap().judgment, "[[B]]");
        // Any change of the request misses: the order, the judge, the prompt, the settings.
        for change in [
            |r: &mut Request| r.user = "q a c".into(),
            |r: &mut Request| r.model = "other".into(),
            |r: &mut Request| r.system = "other".into(),
            |r: &mut Request| r.temperature = 0.2,
            |r: &mut Request| r.max_tokens = 17,
        ] {
            let mut r = e.request.clone();
            change(&mut r);
            assert!(cache.get(&r).is_none(), "{r:?}");
        }
    }

    #[test]
    fn drops_a_line_cut_short_and_rejects_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.jsonl");
        let mut cache = Cache::open(&path).unwrap();
        cache.append(entry("one", "[[A]]")).unwrap();
        drop(cache);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"question_id\": 1, \"shown_fi").unwrap();
        drop(f);
        let mut cache = Cache::open(&path).unwrap();
        assert!(cache.dropped_partial_line);
        assert_eq!(cache.len(), 1);
        cache.append(entry("two", "[[B]]")).unwrap();
        drop(cache);
        let cache = Cache::open(&path).unwrap();
        assert!(!cache.dropped_partial_line);
        assert_eq!(cache.len(), 2);

        std::fs::write(&path, "{\"not\": \"an entry\"}\n").unwrap();
        let e = Cache::open(&path).err().unwrap().to_string();
        assert!(e.contains("cache.jsonl:1: not a cached judgment"), "{e}");
    }
}
