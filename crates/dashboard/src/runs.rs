//! The runs under a directory: which subdirectories are runs, what each one's files say (settings, status,
//! metrics read incrementally), and run names checked so that no request reaches outside the directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::Serialize;

use crate::DashboardError;
use crate::line::{EvalPoint, TrainPoint};
use crate::series::{LineCounts, RunMetrics};
use crate::status::{ShownStatus, StatusFile, run_status};
use crate::tail::{PollReport, TailReader};

/// The metrics file of a run.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The settings file of a run.
pub const CONFIG_FILE: &str = "train_config.toml";
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Limits that keep memory and per-request work bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Points kept per curve (a longer run is thinned evenly).
    pub max_points: usize,
    /// Longest metrics line read; longer ones are skipped and counted.
    pub max_line_bytes: usize,
    /// Bytes of one run's metrics read per refresh: a huge file is caught up over several refreshes.
    pub read_budget_bytes: u64,
    /// Runs listed at most (the most recently changed ones).
    pub max_runs: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits { max_points: 2000, max_line_bytes: 64 << 10, read_budget_bytes: 32 << 20, max_runs: 500 }
    }
}

/// Whether `name` can name a run: one plain path component, not hidden (a run's own temporary directories
/// start with a dot), no separators, at most 255 bytes.
pub fn valid_run_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && Path::new(name).components().count() == 1
}

/// Whether `dir` holds a run (any of the files `qlora train` writes first).
fn is_run_dir(dir: &Path) -> bool {
    [METRICS_FILE, CONFIG_FILE, crate::status::STATUS_FILE].iter().any(|f| dir.join(f).is_file())
}

fn mtime_unix(path: &Path) -> Option<f64> {
    let t = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_secs_f64())
}

/// One run's row: what the run list shows.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub name: String,
    pub status: ShownStatus,
    pub model: Option<String>,
    pub data: Option<String>,
    /// train_config.toml as JSON (null when missing or unreadable; see `config_error`).
    pub config: serde_json::Value,
    pub config_error: Option<String>,
    /// The latest training step and its values.
    pub step: Option<u64>,
    pub total_steps: Option<u64>,
    /// Seconds to go at the mean step time of the last 20 steps (running runs only).
    pub eta_seconds: Option<f64>,
    pub last_train: Option<TrainPoint>,
    pub last_eval: Option<EvalPoint>,
    pub counts: LineCounts,
    pub metrics_bytes: u64,
    /// Bytes of metrics.jsonl read so far (less than `metrics_bytes` while a huge file is being caught up).
    pub read_bytes: u64,
    pub started_unix: Option<f64>,
    pub updated_unix: Option<f64>,
}

/// One run's curves: the points after the ones a client has (`from`), unless `generation` changed.
#[derive(Debug, Clone, Serialize)]
pub struct RunCurves<'a> {
    pub name: &'a str,
    pub generation: u64,
    /// Whether these are all the points (the client drops what it had) or only the new ones.
    pub full: bool,
    pub train_from: usize,
    pub train: &'a [TrainPoint],
    /// The latest training point when it is not among the kept ones (drawn last; replaced on every read).
    pub train_tail: Option<&'a TrainPoint>,
    pub eval_from: usize,
    pub eval: &'a [EvalPoint],
    pub eval_tail: Option<&'a EvalPoint>,
    pub counts: &'a LineCounts,
}

/// What a client already holds of a run's curves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Have {
    pub generation: Option<u64>,
    pub train: usize,
    pub eval: usize,
}

impl Have {
    /// Parses `generation=G&train=K&eval=M` (anything missing or unreadable: nothing held).
    pub fn from_query(query: Option<&str>) -> Self {
        let mut have = Have::default();
        for (key, value) in query.unwrap_or("").split('&').filter_map(|kv| kv.split_once('=')) {
            match key {
                "generation" => have.generation = value.parse().ok(),
                "train" => have.train = value.parse().unwrap_or(0),
                "eval" => have.eval = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        have
    }
}

struct Cached {
    reader: TailReader,
    metrics: RunMetrics,
    last_poll: PollReport,
    read_error: Option<String>,
    config: Option<(Option<f64>, u64, Result<toml::Table, String>)>,
}

/// The runs under one directory, with what has been read of each.
pub struct Runs {
    root: PathBuf,
    only: Option<String>,
    limits: ReadLimits,
    cache: HashMap<String, Cached>,
}

impl Runs {
    /// Every run directory directly under `root`.
    pub fn new(root: impl Into<PathBuf>, limits: ReadLimits) -> Self {
        Runs { root: root.into(), only: None, limits, cache: HashMap::new() }
    }

    /// Just the run in `dir` (for `qlora train --dashboard`): it is listed under its directory name.
    pub fn single(dir: &Path, limits: ReadLimits) -> Result<Self, DashboardError> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| valid_run_name(n))
            .ok_or_else(|| DashboardError::BadRunDir(dir.to_path_buf()))?
            .to_string();
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Ok(Runs { root: parent.to_path_buf(), only: Some(name), limits, cache: HashMap::new() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The names of the runs now on disk, sorted (past `max_runs`, the most recently changed ones).
    pub fn names(&self) -> Result<Vec<String>, DashboardError> {
        if let Some(name) = &self.only {
            let dir = self.root.join(name);
            return Ok(if dir.is_dir() && is_run_dir(&dir) { vec![name.clone()] } else { vec![] });
        }
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            // Not made yet (no run has started): no runs.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(DashboardError::Io { path: self.root.clone(), source }),
        };
        let mut runs: Vec<(f64, String)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok().filter(|n| valid_run_name(n))?;
                let dir = e.path();
                (dir.is_dir() && is_run_dir(&dir)).then(|| {
                    let changed = mtime_unix(&dir.join(METRICS_FILE)).or_else(|| mtime_unix(&dir)).unwrap_or(0.0);
                    (changed, name)
                })
            })
            .collect();
        if runs.len() > self.limits.max_runs {
            runs.sort_by(|a, b| b.0.total_cmp(&a.0));
            runs.truncate(self.limits.max_runs);
        }
        let mut names: Vec<String> = runs.into_iter().map(|(_, n)| n).collect();
        names.sort();
        Ok(names)
    }

    /// The directory of run `name` if it is one of the listed runs (anything else — `..`, a path, a hidden
    /// or non-run directory, a name not listed — is [`DashboardError::NoSuchRun`]).
    fn run_dir(&self, name: &str) -> Result<PathBuf, DashboardError> {
        if !valid_run_name(name) || self.only.as_ref().is_some_and(|o| o != name) {
            return Err(DashboardError::NoSuchRun);
        }
        let dir = self.root.join(name);
        if dir.is_dir() && is_run_dir(&dir) { Ok(dir) } else { Err(DashboardError::NoSuchRun) }
    }

    /// Reads what was appended to run `name`'s files since the last refresh (within the read budget).
    fn refresh(&mut self, name: &str) -> Result<&mut Cached, DashboardError> {
        let dir = self.run_dir(name)?;
        let limits = self.limits;
        let cached = self.cache.entry(name.to_string()).or_insert_with(|| Cached {
            reader: TailReader::new(dir.join(METRICS_FILE), limits.max_line_bytes),
            metrics: RunMetrics::new(limits.max_points),
            last_poll: PollReport::default(),
            read_error: None,
            config: None,
        });
        let metrics = &mut cached.metrics;
        match cached.reader.poll(limits.read_budget_bytes, &mut |event| metrics.apply(event)) {
            Ok(report) => {
                cached.last_poll = report;
                cached.read_error = None;
            }
            Err(e) => cached.read_error = Some(format!("{METRICS_FILE}: {e}")),
        }
        let config_path = dir.join(CONFIG_FILE);
        let stamp = std::fs::metadata(&config_path).ok().map(|m| {
            (m.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs_f64()), m.len())
        });
        match stamp {
            None => cached.config = None,
            Some((mtime, len)) if cached.config.as_ref().is_none_or(|c| c.0 != mtime || c.1 != len) => {
                let table = if len > MAX_CONFIG_BYTES {
                    Err(format!("{CONFIG_FILE}: {len} bytes, more than a settings file holds"))
                } else {
                    std::fs::read_to_string(&config_path)
                        .map_err(|e| e.to_string())
                        .and_then(|t| t.parse::<toml::Table>().map_err(|e| e.to_string()))
                        .map_err(|e| format!("{CONFIG_FILE}: {e}"))
                };
                cached.config = Some((mtime, len, table));
            }
            Some(_) => {}
        }
        Ok(cached)
    }

    /// Every run, refreshed. Runs whose directories are gone are forgotten.
    pub fn summaries(&mut self) -> Result<Vec<RunSummary>, DashboardError> {
        let names = self.names()?;
        self.cache.retain(|name, _| names.contains(name));
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            match self.summary(&name) {
                Ok(s) => out.push(s),
                Err(DashboardError::NoSuchRun) => {} // deleted between the listing and now
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// One run's row, refreshed.
    pub fn summary(&mut self, name: &str) -> Result<RunSummary, DashboardError> {
        let dir = self.run_dir(name)?;
        let cached = self.refresh(name)?;
        let status_file = StatusFile::read(&dir);
        let status = run_status(&dir, &status_file, mtime_unix(cached.reader.path()));
        let status_file = status_file.ok().flatten();
        let (config, mut config_error) = match &cached.config {
            Some((_, _, Ok(table))) => (serde_json::to_value(table).unwrap_or_default(), None),
            Some((_, _, Err(e))) => (serde_json::Value::Null, Some(e.clone())),
            None => (serde_json::Value::Null, None),
        };
        if let Some(e) = &cached.read_error {
            config_error = Some(config_error.map_or(e.clone(), |c| format!("{c}; {e}")));
        }
        let text = |key: &str| config.get(key).and_then(|v| v.as_str()).map(str::to_string);
        let metrics = &cached.metrics;
        let last_train = metrics.train.latest().cloned();
        let step = last_train.as_ref().map(|p| p.step);
        let total_steps = status_file
            .as_ref()
            .and_then(|s| s.total_steps)
            .or_else(|| config.get("max_steps").and_then(|v| v.as_u64()).filter(|&n| n > 0));
        let eta_seconds = match (status.state, step, total_steps, metrics.seconds_per_step()) {
            (crate::status::RunState::Running, Some(step), Some(total), Some(per)) => {
                Some(total.saturating_sub(step) as f64 * per)
            }
            _ => None,
        };
        Ok(RunSummary {
            name: name.to_string(),
            status,
            model: text("model"),
            data: text("data"),
            config_error,
            step,
            total_steps,
            eta_seconds,
            last_train,
            last_eval: metrics.eval.latest().cloned(),
            counts: metrics.counts.clone(),
            metrics_bytes: cached.last_poll.file_bytes,
            read_bytes: cached.last_poll.offset,
            started_unix: status_file.as_ref().and_then(|s| s.started_unix),
            updated_unix: mtime_unix(cached.reader.path()).or(status_file.as_ref().and_then(|s| s.updated_unix)),
            config,
        })
    }

    /// Run `name`'s curves after what the client has, refreshed; `f` serializes them (they borrow the cache).
    pub fn curves<R>(
        &mut self,
        name: &str,
        have: Have,
        f: impl FnOnce(&RunCurves<'_>) -> R,
    ) -> Result<R, DashboardError> {
        let cached = self.refresh(name)?;
        let m = &cached.metrics;
        let full = have.generation != Some(m.generation)
            || have.train > m.train.kept().len()
            || have.eval > m.eval.kept().len();
        let (train_from, eval_from) = if full { (0, 0) } else { (have.train, have.eval) };
        Ok(f(&RunCurves {
            name,
            generation: m.generation,
            full,
            train_from,
            train: &m.train.kept()[train_from..],
            train_tail: m.train.tail(),
            eval_from,
            eval: &m.eval.kept()[eval_from..],
            eval_tail: m.eval.tail(),
            counts: &m.counts,
        }))
    }

    /// Curve points held for the runs read so far: what stays bounded.
    pub fn held_points(&self) -> usize {
        self.cache.values().map(|c| c.metrics.train.kept().len() + c.metrics.eval.kept().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn train_line(step: u64, loss: f64) -> String {
        format!(
            "{{\"kind\":\"train\",\"step\":{step},\"loss\":{loss},\"lr\":0.0002,\"grad_norm\":0.5,\"tokens_per_s\":100.0,\"step_seconds\":2.0,\"peak_rss_mib\":10.0,\"paged_in_bytes\":0,\"paged_out_bytes\":0,\"optimizer_state_bytes\":64,\"epoch\":0.1}}\n"
        )
    }

    fn make_run(root: &Path, name: &str, lines: &str) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), "model = \"smollm2\"\ndata = \"wordnet\"\nmax_steps = 10\nlr = 0.0002\n")
            .unwrap();
        std::fs::write(dir.join(METRICS_FILE), lines).unwrap();
        dir
    }

    #[test]
    fn lists_runs_with_their_settings_status_step_and_eta() {
        let root = tempfile::tempdir().unwrap();
        let a = make_run(root.path(), "alpha", &(train_line(1, 2.5) + &train_line(2, 2.25)));
        StatusFile::running(None).write(&a).unwrap();
        let b = make_run(root.path(), "beta", &train_line(1, 3.0));
        StatusFile::running(Some(4)).with_state(crate::status::RunState::Finished, None).write(&b).unwrap();
        std::fs::create_dir(root.path().join("not-a-run")).unwrap();
        std::fs::create_dir(root.path().join(".checkpoint-1.partial")).unwrap();
        std::fs::write(root.path().join("stray.txt"), "x").unwrap();

        let mut runs = Runs::new(root.path(), ReadLimits::default());
        let list = runs.summaries().unwrap();
        let names: Vec<&str> = list.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["alpha", "beta"]);
        let alpha = &list[0];
        assert_eq!(alpha.status.state, crate::status::RunState::Running);
        assert_eq!((alpha.model.as_deref(), alpha.data.as_deref()), (Some("smollm2"), Some("wordnet")));
        assert_eq!(alpha.config["lr"], 0.0002);
        assert_eq!((alpha.step, alpha.total_steps), (Some(2), Some(10)), "total from max_steps");
        assert_eq!(alpha.eta_seconds, Some(16.0), "8 steps to go at 2 s");
        assert_eq!(alpha.last_train.as_ref().unwrap().loss, Some(2.25));
        assert_eq!(list[1].status.state, crate::status::RunState::Finished);
        assert_eq!((list[1].total_steps, list[1].eta_seconds), (Some(4), None), "status file wins; no ETA when done");

        // A run appearing later shows up, a deleted one goes.
        make_run(root.path(), "gamma", "");
        std::fs::remove_dir_all(&b).unwrap();
        let names: Vec<String> = runs.summaries().unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["alpha", "gamma"]);
        assert!(matches!(runs.summary("beta"), Err(DashboardError::NoSuchRun)));
        assert!(matches!(runs.curves("beta", Have::default(), |_| ()), Err(DashboardError::NoSuchRun)));
    }

    #[test]
    fn names_that_leave_the_directory_are_no_runs() {
        let root = tempfile::tempdir().unwrap();
        let inner = root.path().join("runs");
        std::fs::create_dir(&inner).unwrap();
        // A run beside the runs directory, which `..` would reach.
        make_run(root.path(), "outside", &train_line(1, 1.0));
        make_run(&inner, "odd name #1 ü %2F?", &train_line(1, 1.0));
        let mut runs = Runs::new(&inner, ReadLimits::default());
        for bad in ["..", "../outside", ".", "", "/etc", "a/b", "..\\outside", "x\0y", ".hidden", "nope"] {
            assert!(matches!(runs.summary(bad), Err(DashboardError::NoSuchRun)), "{bad:?}");
            assert!(matches!(runs.curves(bad, Have::default(), |_| ()), Err(DashboardError::NoSuchRun)), "{bad:?}");
        }
        assert_eq!(runs.summary("odd name #1 ü %2F?").unwrap().step, Some(1));
        // A single-run view lists that run only.
        let single = Runs::single(&inner.join("odd name #1 ü %2F?"), ReadLimits::default()).unwrap();
        assert_eq!(single.names().unwrap(), ["odd name #1 ü %2F?"]);
        let mut single = Runs::single(&root.path().join("outside"), ReadLimits::default()).unwrap();
        assert!(matches!(single.summary("runs"), Err(DashboardError::NoSuchRun)));
        assert!(Runs::single(Path::new("/"), ReadLimits::default()).is_err());
    }

    #[test]
    fn curves_come_incrementally_and_whole_after_a_rewrite() {
        let root = tempfile::tempdir().unwrap();
        let dir = make_run(root.path(), "r", &(train_line(1, 2.0) + &train_line(2, 1.9)));
        let mut runs = Runs::new(root.path(), ReadLimits { max_points: 100, ..ReadLimits::default() });
        let (generation, n) = runs.curves("r", Have::default(), |c| (c.generation, c.train.len())).unwrap();
        assert_eq!(n, 2);
        let mut f = std::fs::OpenOptions::new().append(true).open(dir.join(METRICS_FILE)).unwrap();
        f.write_all(train_line(3, 1.8).as_bytes()).unwrap();
        f.write_all(b"{\"kind\":\"eval\",\"step\":3,\"eval_loss\":1.85}\n{\"kind\":\"tra").unwrap();
        let have = Have { generation: Some(generation), train: 2, eval: 0 };
        let got = runs
            .curves("r", have, |c| (c.full, c.train.iter().map(|p| p.step).collect::<Vec<_>>(), c.eval.len()))
            .unwrap();
        assert_eq!(got, (false, vec![3], 1), "only the new points; the half line waits");
        // A resumed run rewrites the file from its checkpoint at step 2: one run, cut back, read whole.
        let tmp = dir.join(".metrics.tmp");
        std::fs::write(&tmp, train_line(1, 2.0) + &train_line(2, 1.9) + &train_line(3, 1.7)).unwrap();
        std::fs::rename(&tmp, dir.join(METRICS_FILE)).unwrap();
        let have = Have { generation: Some(generation), train: 3, eval: 1 };
        let got = runs
            .curves("r", have, |c| {
                (c.full, c.train.iter().map(|p| (p.step, p.loss.unwrap())).collect::<Vec<_>>(), c.eval.len())
            })
            .unwrap();
        assert_eq!(got, (true, vec![(1, 2.0), (2, 1.9), (3, 1.7)], 0));
        assert_eq!(
            Have::from_query(Some("generation=4&train=7&eval=x&zz")),
            Have { generation: Some(4), train: 7, eval: 0 }
        );
    }

    /// A metrics file far larger than the point budget: memory holds the budget, the read proceeds by budget
    /// per refresh, and the end of the file is read exactly.
    #[test]
    fn a_huge_metrics_file_is_read_incrementally_in_bounded_memory() {
        let root = tempfile::tempdir().unwrap();
        let dir = make_run(root.path(), "big", "");
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join(METRICS_FILE)).unwrap());
        let steps = 200_000u64;
        for step in 1..=steps {
            f.write_all(train_line(step, 1.0 + 1.0 / step as f64).as_bytes()).unwrap();
            if step % 1000 == 0 {
                writeln!(f, "{{\"kind\":\"eval\",\"step\":{step},\"eval_loss\":1.5}}").unwrap();
            }
            if step % 50_000 == 0 {
                writeln!(f, "garbage {step}").unwrap();
            }
        }
        drop(f);
        let size = std::fs::metadata(dir.join(METRICS_FILE)).unwrap().len();
        let limits = ReadLimits { max_points: 500, read_budget_bytes: 8 << 20, ..ReadLimits::default() };
        let mut runs = Runs::new(root.path(), limits);
        let mut refreshes = 0;
        let last = loop {
            let s = runs.summary("big").unwrap();
            refreshes += 1;
            assert!(runs.held_points() <= 2 * 500, "held {} points", runs.held_points());
            if s.read_bytes == s.metrics_bytes {
                break s;
            }
            assert!(s.read_bytes < s.metrics_bytes && s.read_bytes <= refreshes * (8 << 20));
        };
        assert_eq!(last.metrics_bytes, size);
        assert!(refreshes >= size.div_ceil(8 << 20), "{size} bytes in {refreshes} refreshes");
        assert_eq!(last.step, Some(steps));
        assert_eq!(last.last_train.unwrap().loss, Some(1.0 + 1.0 / steps as f64));
        assert_eq!(last.counts.malformed, 4);
        assert_eq!(last.counts.lines, steps + steps / 1000 + 4);
        let (n, end) = runs
            .curves("big", Have::default(), |c| (c.train.len(), c.train_tail.or(c.train.last()).map(|p| p.step)))
            .unwrap();
        assert!((250..=500).contains(&n), "{n} points");
        assert_eq!(end, Some(steps), "the curve ends at the last line");
    }
}
