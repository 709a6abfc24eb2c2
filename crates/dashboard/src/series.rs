//! A run's metrics in memory: the training and held-out curves, each held to a fixed number of points
//! however long the run (when a curve fills up, every other point is dropped and from then on only every
//! second one is kept, so the curve keeps its shape over the whole run), plus the exact latest line.

use std::collections::VecDeque;

use serde::Serialize;

use crate::line::{EvalPoint, MetricsLine, TrainPoint, parse_line};
use crate::tail::TailEvent;

/// Something on a step axis.
pub trait Stepped: Clone {
    fn step(&self) -> u64;
}

impl Stepped for TrainPoint {
    fn step(&self) -> u64 {
        self.step
    }
}

impl Stepped for EvalPoint {
    fn step(&self) -> u64 {
        self.step
    }
}

/// One curve with at most `max_points` kept points and the latest point exactly.
#[derive(Debug, Clone)]
pub struct Series<T> {
    kept: Vec<T>,
    /// Keep one point in `stride`.
    stride: u64,
    /// Points pushed since the curve began (after a cut: as if the kept ones had been pushed at the stride).
    pushed: u64,
    latest: Option<T>,
    max_points: usize,
}

impl<T: Stepped> Series<T> {
    pub fn new(max_points: usize) -> Self {
        Series { kept: Vec::new(), stride: 1, pushed: 0, latest: None, max_points: max_points.max(2) }
    }

    /// Adds a point. A point whose step is before the latest one (a restarted writer) first cuts the curve
    /// back to the points before it, so a resumed run reads as one run; `allow_equal` keeps a point at the
    /// same step as the latest (two evals at one step). Returns whether points already handed out changed.
    pub fn push(&mut self, p: T, allow_equal: bool) -> bool {
        let mut changed = false;
        if let Some(latest) = &self.latest {
            let back = if allow_equal { p.step() < latest.step() } else { p.step() <= latest.step() };
            if back {
                let step = p.step();
                self.kept.retain(|q| if allow_equal { q.step() <= step } else { q.step() < step });
                self.pushed = self.kept.len() as u64 * self.stride;
                changed = true;
            }
        }
        if self.pushed.is_multiple_of(self.stride) {
            self.kept.push(p.clone());
            if self.kept.len() > self.max_points {
                let mut i = 0;
                self.kept.retain(|_| {
                    i += 1;
                    i % 2 == 1
                });
                self.stride *= 2;
                changed = true;
            }
        }
        self.pushed += 1;
        self.latest = Some(p);
        changed
    }

    /// The kept points.
    pub fn kept(&self) -> &[T] {
        &self.kept
    }

    /// The latest point when it is not the last kept one (draw it after them).
    pub fn tail(&self) -> Option<&T> {
        let latest = self.latest.as_ref()?;
        match self.kept.last() {
            Some(k) if k.step() == latest.step() && self.pushed.saturating_sub(1).is_multiple_of(self.stride) => None,
            _ => Some(latest),
        }
    }

    pub fn latest(&self) -> Option<&T> {
        self.latest.as_ref()
    }

    /// Kept points plus the tail: at most `max_points + 1`.
    pub fn len_shown(&self) -> usize {
        self.kept.len() + usize::from(self.tail().is_some())
    }
}

/// Ends of the counters of the lines of a file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LineCounts {
    /// Lines read (good, bad and empty).
    pub lines: u64,
    /// Lines skipped as malformed (not JSON, no kind or step, or longer than the line limit).
    pub malformed: u64,
    /// The first few malformed lines: "line N: why".
    pub malformed_examples: Vec<String>,
}

const EXAMPLES: usize = 5;
const RECENT: usize = 20;

/// Everything read from one `metrics.jsonl`.
#[derive(Debug, Clone)]
pub struct RunMetrics {
    pub train: Series<TrainPoint>,
    pub eval: Series<EvalPoint>,
    pub counts: LineCounts,
    /// Changes whenever points already handed out change (a reset, a cut, a thinning): clients then reload.
    pub generation: u64,
    recent_step_seconds: VecDeque<f64>,
    max_points: usize,
}

impl RunMetrics {
    pub fn new(max_points: usize) -> Self {
        RunMetrics {
            train: Series::new(max_points),
            eval: Series::new(max_points),
            counts: LineCounts::default(),
            generation: 0,
            recent_step_seconds: VecDeque::new(),
            max_points,
        }
    }

    /// Takes what a [`crate::tail::TailReader`] poll found.
    pub fn apply(&mut self, event: TailEvent<'_>) {
        match event {
            TailEvent::Reset => {
                let generation = self.generation + 1;
                *self = RunMetrics::new(self.max_points);
                self.generation = generation;
            }
            TailEvent::Overlong => {
                self.counts.lines += 1;
                self.bad("longer than the line limit".into());
            }
            TailEvent::Line(line) => {
                self.counts.lines += 1;
                if line.iter().all(u8::is_ascii_whitespace) {
                    return;
                }
                match parse_line(line) {
                    Ok(MetricsLine::Train(p)) => {
                        if let Some(s) = p.step_seconds {
                            if self.recent_step_seconds.len() == RECENT {
                                self.recent_step_seconds.pop_front();
                            }
                            self.recent_step_seconds.push_back(s);
                        }
                        if self.train.push(p, false) {
                            self.generation += 1;
                        }
                    }
                    Ok(MetricsLine::Eval(p)) => {
                        if self.eval.push(p, true) {
                            self.generation += 1;
                        }
                    }
                    Ok(MetricsLine::Other) => {}
                    Err(e) => self.bad(e.to_string()),
                }
            }
        }
    }

    fn bad(&mut self, why: String) {
        self.counts.malformed += 1;
        if self.counts.malformed_examples.len() < EXAMPLES {
            self.counts.malformed_examples.push(format!("line {}: {why}", self.counts.lines));
        }
    }

    /// Mean seconds per step over the last few steps.
    pub fn seconds_per_step(&self) -> Option<f64> {
        (!self.recent_step_seconds.is_empty())
            .then(|| self.recent_step_seconds.iter().sum::<f64>() / self.recent_step_seconds.len() as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(step: u64, loss: f64) -> TrainPoint {
        TrainPoint { step, loss: Some(loss), ..TrainPoint::default() }
    }

    fn steps<T: Stepped>(s: &Series<T>) -> Vec<u64> {
        s.kept().iter().chain(s.tail()).map(Stepped::step).collect()
    }

    #[test]
    fn a_long_curve_stays_within_its_point_budget_and_ends_at_the_latest_point() {
        let mut s = Series::new(8);
        for step in 1..=1000 {
            s.push(tp(step, 1.0 / step as f64), false);
            assert!(s.kept().len() <= 8 && s.len_shown() <= 9);
            assert_eq!(*steps(&s).last().unwrap(), step, "the latest point is always shown");
            assert_eq!(steps(&s)[0], 1, "the first point stays");
        }
        let shown = steps(&s);
        assert!(shown.len() >= 5, "still a curve: {shown:?}");
        assert!(shown.windows(2).all(|w| w[0] < w[1]), "{shown:?}");
        // Evenly spaced: every kept gap is the stride.
        let gaps: Vec<u64> = s.kept().windows(2).map(|w| w[1].step - w[0].step).collect();
        assert!(gaps.iter().all(|&g| g == gaps[0]), "{gaps:?}");
    }

    #[test]
    fn a_restarted_writer_cuts_the_curve_back() {
        let mut s = Series::new(100);
        for step in 1..=10 {
            s.push(tp(step, 1.0), false);
        }
        assert!(s.push(tp(7, 2.0), false), "a cut changes what was handed out");
        assert_eq!(steps(&s), [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(s.latest().unwrap().loss, Some(2.0));
        let mut e = Series::new(100);
        e.push(EvalPoint { step: 5, ..Default::default() }, true);
        assert!(!e.push(EvalPoint { step: 5, ..Default::default() }, true), "two evals at one step are kept");
        assert_eq!(steps(&e), [5, 5]);
    }

    #[test]
    fn counts_and_names_malformed_lines() {
        let mut m = RunMetrics::new(16);
        m.apply(TailEvent::Line(br#"{"kind":"train","step":1,"loss":2.0,"step_seconds":1.0}"#));
        m.apply(TailEvent::Line(b"{not json"));
        m.apply(TailEvent::Line(b""));
        m.apply(TailEvent::Overlong);
        m.apply(TailEvent::Line(br#"{"kind":"train","step":2,"loss":1.5,"step_seconds":3.0}"#));
        m.apply(TailEvent::Line(br#"{"kind":"eval","step":2,"eval_loss":1.7}"#));
        assert_eq!((m.counts.lines, m.counts.malformed), (6, 2));
        assert!(m.counts.malformed_examples[0].starts_with("line 2: not a JSON object"), "{:?}", m.counts);
        assert_eq!(m.counts.malformed_examples[1], "line 4: longer than the line limit");
        assert_eq!(m.train.latest().unwrap().loss, Some(1.5));
        assert_eq!(m.eval.latest().unwrap().loss, Some(1.7));
        assert_eq!(m.seconds_per_step(), Some(2.0));
        let generation = m.generation;
        m.apply(TailEvent::Reset);
        assert!(m.generation > generation && m.train.latest().is_none() && m.counts.lines == 0);
    }
}
