//! The two evaluations, over any [`Judge`] and a [`Cache`].
//!
//! - [`pairwise`]: every pair of systems on every question, in both orders; the two verdicts make one
//!   battle ([`crate::verdict::combine`]).
//! - [`score`]: each system against a reference system, both rated 1–10 in both orders; the report gives
//!   Σ system / Σ reference per category and overall with bootstrap intervals ([`score_report`]).
//!
//! Judgments are asked one at a time, in a fixed order, and appended to the cache as they arrive; what is
//! cached is never asked again. The first turn of each question is judged (the Vicuna benchmark has one).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::JudgeError;
use crate::cache::{Cache, Entry, Request, now};
use crate::client::{ChatClient, Extra};
use crate::files::{AnswerSet, Question, QuestionId, Winner};
use crate::prompt::{JudgePrompt, PromptKind};
use crate::stats::{RatioInterval, bootstrap_ratio};
use crate::verdict::{Verdict, combine, parse_pairwise, parse_scores};

/// Something that answers judge requests.
pub trait Judge {
    fn complete(&mut self, request: &Request) -> Result<String, JudgeError>;
}

impl Judge for ChatClient {
    fn complete(&mut self, request: &Request) -> Result<String, JudgeError> {
        ChatClient::complete(self, request, Extra::default())
    }
}

/// The judge model and its sampling settings (FastChat's judges run at temperature 0).
#[derive(Debug, Clone)]
pub struct JudgeSettings {
    pub model: String,
    pub temperature: f64,
    pub max_tokens: usize,
}

/// How a run went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Judgments asked of the judge in this run.
    pub asked: usize,
    /// Judgments found in the cache.
    pub cached: usize,
    /// Judgments that could not be read (kept in the cache, never guessed).
    pub unparseable: usize,
}

/// Reports each judgment as it is settled: (done, total, whether it came from the cache).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, bool);

struct Asker<'a> {
    prompt: &'a JudgePrompt,
    settings: &'a JudgeSettings,
    judge: &'a mut dyn Judge,
    cache: &'a mut Cache,
    counts: Counts,
    done: usize,
    total: usize,
    progress: Progress<'a>,
}

impl Asker<'_> {
    /// The judgment of `question` with `first`'s answer shown first (A / Assistant 1).
    fn ask(&mut self, question: &Question, first: &AnswerSet, second: &AnswerSet) -> Result<Entry, JudgeError> {
        fn answer<'s>(set: &'s AnswerSet, id: &QuestionId) -> &'s str {
            &set.answers[id].turns[0]
        }
        let request = Request {
            model: self.settings.model.clone(),
            system: self.prompt.system_prompt.clone(),
            examples: self.prompt.examples.iter().map(|e| (e.user.clone(), e.assistant.clone())).collect(),
            user: self.prompt.user_message(
                &question.turns[0],
                answer(first, &question.id),
                answer(second, &question.id),
            ),
            temperature: self.settings.temperature,
            max_tokens: self.settings.max_tokens,
        };
        let (entry, cached) = match self.cache.get(&request) {
            Some(entry) => (entry.clone(), true),
            None => {
                let judgment = self.judge.complete(&request)?;
                let (verdict, scores) = match self.prompt.kind {
                    PromptKind::Pairwise => (Some(parse_pairwise(self.prompt.output_format, &judgment)), None),
                    PromptKind::Score => (None, parse_scores(&judgment)),
                };
                let entry = Entry {
                    question_id: question.id.clone(),
                    shown_first: first.name.clone(),
                    shown_second: second.name.clone(),
                    prompt: self.prompt.name.clone(),
                    judgment,
                    verdict,
                    scores,
                    tstamp: now(),
                    request,
                };
                self.cache.append(entry.clone())?;
                (entry, false)
            }
        };
        if cached {
            self.counts.cached += 1;
        } else {
            self.counts.asked += 1;
        }
        let readable = match self.prompt.kind {
            PromptKind::Pairwise => parse_pairwise(self.prompt.output_format, &entry.judgment) != Verdict::Error,
            PromptKind::Score => parse_scores(&entry.judgment).is_some(),
        };
        if !readable {
            self.counts.unparseable += 1;
        }
        self.done += 1;
        (self.progress)(self.done, self.total, cached);
        Ok(entry)
    }
}

fn check_systems(systems: &[&AnswerSet]) -> Result<(), JudgeError> {
    let mut seen: BTreeMap<&str, &AnswerSet> = BTreeMap::new();
    for s in systems {
        if let Some(other) = seen.insert(&s.name, s) {
            return Err(JudgeError::Input(format!(
                "{} and {} both name the system `{}` (set model_id, or rename a file)",
                other.path.display(),
                s.path.display(),
                s.name
            )));
        }
    }
    Ok(())
}

/// One question judged between two systems, in both orders.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairResult {
    pub question_id: QuestionId,
    pub category: String,
    pub model_a: String,
    pub model_b: String,
    /// The verdict with model_a shown first, and with model_b shown first (the judge's own labels).
    pub g1_verdict: Verdict,
    pub g2_verdict: Verdict,
    /// None when either judgment could not be read.
    pub winner: Option<Winner>,
}

/// Judges every pair of `systems` on every question, both orders.
pub fn pairwise(
    questions: &[Question],
    systems: &[AnswerSet],
    prompt: &JudgePrompt,
    settings: &JudgeSettings,
    judge: &mut dyn Judge,
    cache: &mut Cache,
    progress: Progress,
) -> Result<(Vec<PairResult>, Counts), JudgeError> {
    if prompt.kind != PromptKind::Pairwise {
        return Err(JudgeError::Input(format!("prompt `{}` is not a pairwise prompt", prompt.name)));
    }
    if systems.len() < 2 {
        return Err(JudgeError::Input("pairwise judging needs answers from at least two systems".into()));
    }
    check_systems(&systems.iter().collect::<Vec<_>>())?;
    let pairs = systems.len() * (systems.len() - 1) / 2;
    let total = 2 * pairs * questions.len();
    let mut asker = Asker { prompt, settings, judge, cache, counts: Counts::default(), done: 0, total, progress };
    let mut results = Vec::new();
    for (i, a) in systems.iter().enumerate() {
        for b in &systems[i + 1..] {
            for q in questions {
                let g1 = parse_pairwise(prompt.output_format, &asker.ask(q, a, b)?.judgment);
                let g2 = parse_pairwise(prompt.output_format, &asker.ask(q, b, a)?.judgment);
                results.push(PairResult {
                    question_id: q.id.clone(),
                    category: q.category.clone(),
                    model_a: a.name.clone(),
                    model_b: b.name.clone(),
                    g1_verdict: g1,
                    g2_verdict: g2,
                    winner: combine(g1, g2),
                });
            }
        }
    }
    Ok((results, asker.counts))
}

/// A system's and the reference's score on one question, each the mean of the two orders.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuestionScore {
    pub question_id: QuestionId,
    pub category: String,
    pub system: f64,
    pub reference: f64,
}

/// One system's scores against the reference.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SystemScores {
    pub name: String,
    /// Questions with readable scores in both orders.
    pub questions: Vec<QuestionScore>,
    /// Questions left out because a judgment could not be read.
    pub unreadable: Vec<QuestionId>,
}

/// Rates each system and the reference 1–10 on every question, both orders (reference first, then the
/// system first).
pub fn score(
    questions: &[Question],
    systems: &[AnswerSet],
    reference: &AnswerSet,
    prompt: &JudgePrompt,
    settings: &JudgeSettings,
    judge: &mut dyn Judge,
    cache: &mut Cache,
    progress: Progress,
) -> Result<(Vec<SystemScores>, Counts), JudgeError> {
    if prompt.kind != PromptKind::Score {
        return Err(JudgeError::Input(format!("prompt `{}` is not a scoring prompt", prompt.name)));
    }
    let mut all: Vec<&AnswerSet> = systems.iter().collect();
    all.push(reference);
    check_systems(&all)?;
    let total = 2 * systems.len() * questions.len();
    let mut asker = Asker { prompt, settings, judge, cache, counts: Counts::default(), done: 0, total, progress };
    let mut out = Vec::new();
    for system in systems {
        let mut scores = SystemScores { name: system.name.clone(), questions: Vec::new(), unreadable: Vec::new() };
        for q in questions {
            let ref_first = parse_scores(&asker.ask(q, reference, system)?.judgment);
            let sys_first = parse_scores(&asker.ask(q, system, reference)?.judgment);
            match (ref_first, sys_first) {
                (Some([r1, s1]), Some([s2, r2])) => scores.questions.push(QuestionScore {
                    question_id: q.id.clone(),
                    category: q.category.clone(),
                    system: (s1 + s2) / 2.0,
                    reference: (r1 + r2) / 2.0,
                }),
                _ => scores.unreadable.push(q.id.clone()),
            }
        }
        out.push(scores);
    }
    Ok((out, asker.counts))
}

/// A system's score ratios: overall and per category.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoreReport {
    pub overall: RatioInterval,
    pub categories: BTreeMap<String, RatioInterval>,
    pub unreadable_questions: usize,
}

/// The total-score ratio against the reference with bootstrap 95% intervals (`rounds` resamples of the
/// questions, seeded), overall and per category.
pub fn score_report(scores: &SystemScores, rounds: usize, seed: u64) -> ScoreReport {
    let pairs = |filter: &dyn Fn(&QuestionScore) -> bool| -> Vec<(f64, f64)> {
        scores.questions.iter().filter(|q| filter(q)).map(|q| (q.system, q.reference)).collect()
    };
    let mut categories = BTreeMap::new();
    for q in &scores.questions {
        if !categories.contains_key(&q.category) {
            let p = pairs(&|x: &QuestionScore| x.category == q.category);
            categories.insert(q.category.clone(), bootstrap_ratio(&p, rounds, seed));
        }
    }
    ScoreReport {
        overall: bootstrap_ratio(&pairs(&|_: &QuestionScore| true), rounds, seed),
        categories,
        unreadable_questions: scores.unreadable.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::Answer;

    /// A judge that prefers the longer answer (ties on equal length), counts its calls, and cannot decide
    /// about anything containing "???".
    struct Longer {
        calls: usize,
    }

    fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
        let s = text.find(start).unwrap() + start.len();
        let e = text[s..].find(end).unwrap() + s;
        &text[s..e]
    }

    impl Judge for Longer {
        fn complete(&mut self, request: &Request) -> Result<String, JudgeError> {
            self.calls += 1;
            let u = &request.user;
            if u.contains("???") {
                return Ok("Hard to say.".into());
            }
            if u.contains("[The Start of Assistant A's Answer]") {
                let a = between(u, "Assistant A's Answer]\n", "\n[The End").len();
                let b = between(u, "Assistant B's Answer]\n", "\n[The End").len();
                return Ok(match a.cmp(&b) {
                    std::cmp::Ordering::Greater => "A is longer. [[A]]",
                    std::cmp::Ordering::Less => "B is longer. [[B]]",
                    std::cmp::Ordering::Equal => "Same. [[C]]",
                }
                .into());
            }
            let a = between(u, "Assistant 1's Answer]\n", "\n\n[The End").len();
            let b = between(u, "Assistant 2's Answer]\n", "\n\n[The End").len();
            Ok(format!("{} {}\nlonger is better", a.min(10), b.min(10)))
        }
    }

    fn questions() -> Vec<Question> {
        (1..=3)
            .map(|i| Question {
                id: QuestionId::Int(i),
                category: if i == 3 { "math".into() } else { "generic".into() },
                turns: vec![format!("question {i}")],
            })
            .collect()
    }

    fn system(name: &str, answers: [&str; 3]) -> AnswerSet {
        AnswerSet {
            name: name.into(),
            path: format!("{name}.jsonl").into(),
            answers: answers
                .iter()
                .enumerate()
                .map(|(i, a)| (QuestionId::Int(i as i64 + 1), Answer { turns: vec![a.to_string()], line: i + 1 }))
                .collect(),
        }
    }

    fn settings() -> JudgeSettings {
        JudgeSettings { model: "longer".into(), temperature: 0.0, max_tokens: 64 }
    }

    #[test]
    fn pairwise_asks_both_orders_once_and_resumes_from_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.jsonl");
        let systems = vec![
            system("long", ["aaaa", "aaaa", "???"]),
            system("short", ["b", "bbbb", "b"]),
            system("mid", ["cc", "cc", "cc"]),
        ];
        let prompt = JudgePrompt::builtin(PromptKind::Pairwise);
        let mut judge = Longer { calls: 0 };
        let mut cache = Cache::open(&path).unwrap();
        let mut seen = Vec::new();
        let (results, counts) =
            pairwise(&questions(), &systems, &prompt, &settings(), &mut judge, &mut cache, &mut |d, t, c| {
                seen.push((d, t, c))
            })
            .unwrap();
        assert_eq!(judge.calls, 18);
        assert_eq!(counts, Counts { asked: 18, cached: 0, unparseable: 4 });
        assert_eq!(seen.last(), Some(&(18, 18, false)));
        assert_eq!(results.len(), 9);
        let r = |a: &str, b: &str, q: i64| {
            results.iter().find(|r| r.model_a == a && r.model_b == b && r.question_id == QuestionId::Int(q)).unwrap()
        };
        assert_eq!(r("long", "short", 1).winner, Some(Winner::ModelA));
        assert_eq!((r("long", "short", 1).g1_verdict, r("long", "short", 1).g2_verdict), (Verdict::A, Verdict::B));
        assert_eq!(r("long", "short", 2).winner, Some(Winner::Tie));
        assert_eq!(r("short", "mid", 1).winner, Some(Winner::ModelB));
        assert_eq!(r("long", "mid", 3).winner, None, "unreadable: no battle");
        assert_eq!(r("long", "mid", 3).g1_verdict, Verdict::Error);

        // Every request differs here (distinct answers), so each was asked once.
        // A second run over the same cache asks nothing and gives the same results.
        drop(cache);
        let mut cache = Cache::open(&path).unwrap();
        let (again, counts) =
            pairwise(&questions(), &systems, &prompt, &settings(), &mut judge, &mut cache, &mut |_, _, _| {}).unwrap();
        assert_eq!(judge.calls, 18);
        assert_eq!(counts, Counts { asked: 0, cached: 18, unparseable: 4 });
        assert_eq!(again, results);

        // A changed answer asks only the judgments that show it (2 pairs × 2 orders).
        let mut changed = systems.clone();
        changed[2].answers.get_mut(&QuestionId::Int(2)).unwrap().turns[0] = "cccccc".into();
        let (_, counts) =
            pairwise(&questions(), &changed, &prompt, &settings(), &mut judge, &mut cache, &mut |_, _, _| {}).unwrap();
        assert_eq!((counts.asked, counts.cached), (4, 14));
        assert_eq!(judge.calls, 22);
    }

    #[test]
    fn pairwise_rejects_one_system_and_duplicate_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = Cache::open(&dir.path().join("c.jsonl")).unwrap();
        let prompt = JudgePrompt::builtin(PromptKind::Pairwise);
        let mut judge = Longer { calls: 0 };
        let one = vec![system("x", ["a", "b", "c"])];
        assert!(pairwise(&questions(), &one, &prompt, &settings(), &mut judge, &mut cache, &mut |_, _, _| {}).is_err());
        let mut two = one.clone();
        two.push(system("x", ["a", "b", "c"]));
        let e = pairwise(&questions(), &two, &prompt, &settings(), &mut judge, &mut cache, &mut |_, _, _| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("both name the system `x`"), "{e}");
        assert_eq!(judge.calls, 0);
    }

    #[test]
    fn scores_in_both_orders_against_the_reference() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = Cache::open(&dir.path().join("c.jsonl")).unwrap();
        let prompt = JudgePrompt::builtin(PromptKind::Score);
        let mut judge = Longer { calls: 0 };
        let reference = system("ref", ["aaaa", "aaaa", "aaaa"]);
        let systems = vec![system("sys", ["bb", "bbbb", "bbb"]), system("bad", ["c", "???", "c"])];
        let (scores, counts) =
            score(&questions(), &systems, &reference, &prompt, &settings(), &mut judge, &mut cache, &mut |_, _, _| {})
                .unwrap();
        assert_eq!(counts, Counts { asked: 12, cached: 0, unparseable: 2 });
        assert_eq!(
            scores[0].questions.iter().map(|q| (q.system, q.reference)).collect::<Vec<_>>(),
            vec![(2.0, 4.0), (4.0, 4.0), (3.0, 4.0)]
        );
        assert_eq!(scores[1].unreadable, vec![QuestionId::Int(2)]);
        let report = score_report(&scores[0], 200, 0);
        assert!((report.overall.ratio - 9.0 / 12.0).abs() < 1e-12);
        assert_eq!(report.overall.questions, 3);
        assert!((report.categories["generic"].ratio - 6.0 / 8.0).abs() < 1e-12);
        assert!((report.categories["math"].ratio - 0.75).abs() < 1e-12);
        assert_eq!(score_report(&scores[1], 200, 0).unreadable_questions, 1);
        // The wrong kind of prompt is refused before anything is asked.
        let pair = JudgePrompt::builtin(PromptKind::Pairwise);
        assert!(
            score(&questions(), &systems, &reference, &pair, &settings(), &mut judge, &mut cache, &mut |_, _, _| {})
                .is_err()
        );
    }
}
