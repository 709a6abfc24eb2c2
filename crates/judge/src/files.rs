//! The evaluation's files, in FastChat's formats.
//!
//! - questions (`question.jsonl` of `fastchat/llm_judge/data/*`): `{"question_id": 1, "category": "generic",
//!   "turns": ["..."]}`; the older Vicuna table form `{"question_id", "category", "text"}` is read too.
//! - answers (`model_answer/*.jsonl`): `{"question_id", "model_id", "choices": [{"index": 0, "turns":
//!   ["..."]}]}`, or qlora's `{"question_id", "text"}`. The system's name is `model_id` (the file's stem
//!   when the lines carry none). `qlora answer` adds a `generation` object (model, adapter, sampling).
//! - battles (FastChat's `elo_analysis` input): `{"question_id", "model_a", "model_b", "winner":
//!   "model_a" | "model_b" | "tie"}` (`"tie (bothbad)"` is read as a tie); other fields are ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::JudgeError;

/// A question id as the file spells it: FastChat's benchmarks number them, others use strings.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum QuestionId {
    Int(i64),
    Text(String),
}

impl fmt::Display for QuestionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuestionId::Int(i) => write!(f, "{i}"),
            QuestionId::Text(s) => f.write_str(s),
        }
    }
}

/// One benchmark question.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub id: QuestionId,
    pub category: String,
    /// The user turns (one for the Vicuna benchmark, two for MT-bench).
    pub turns: Vec<String>,
}

/// One system's answer to one question.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The assistant turns, one per question turn.
    pub turns: Vec<String>,
    /// Where it was read (1-based line).
    pub line: usize,
}

/// A system's answers, by question.
#[derive(Debug, Clone)]
pub struct AnswerSet {
    /// The system's name (`model_id`, or the file's stem).
    pub name: String,
    pub path: PathBuf,
    pub answers: BTreeMap<QuestionId, Answer>,
}

/// The outcome of one battle, as FastChat writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Winner {
    ModelA,
    ModelB,
    #[serde(alias = "tie (bothbad)")]
    Tie,
}

/// One game between two systems on one question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Battle {
    pub question_id: QuestionId,
    pub model_a: String,
    pub model_b: String,
    pub winner: Winner,
}

/// The non-blank lines of a JSONL file, parsed, with their 1-based line numbers.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Value)>, JudgeError> {
    let text = std::fs::read_to_string(path).map_err(JudgeError::io(path))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| line_error(path, i + 1, format!("not JSON: {e}")))?;
        if !value.is_object() {
            return Err(line_error(path, i + 1, "expected a JSON object".into()));
        }
        out.push((i + 1, value));
    }
    Ok(out)
}

pub(crate) fn line_error(path: &Path, line: usize, reason: String) -> JudgeError {
    JudgeError::Line { path: path.to_path_buf(), line, reason }
}

fn question_id(path: &Path, line: usize, v: &Value) -> Result<QuestionId, JudgeError> {
    match v.get("question_id") {
        Some(Value::Number(n)) if n.is_i64() => Ok(QuestionId::Int(n.as_i64().expect("i64"))),
        Some(Value::String(s)) if !s.is_empty() => Ok(QuestionId::Text(s.clone())),
        Some(other) => Err(line_error(path, line, format!("question_id must be an integer or a string, not {other}"))),
        None => Err(line_error(path, line, "no question_id".into())),
    }
}

fn string_list(path: &Path, line: usize, field: &str, v: &Value) -> Result<Vec<String>, JudgeError> {
    let list = v.as_array().ok_or_else(|| line_error(path, line, format!("{field} must be a list of strings")))?;
    if list.is_empty() {
        return Err(line_error(path, line, format!("{field} is empty")));
    }
    list.iter()
        .map(|t| {
            t.as_str().map(str::to_string).ok_or_else(|| line_error(path, line, format!("{field} holds a non-string")))
        })
        .collect()
}

/// Reads a question file; ids must be unique.
pub fn read_questions(path: &Path) -> Result<Vec<Question>, JudgeError> {
    let mut seen = BTreeMap::new();
    let mut questions = Vec::new();
    for (line, v) in read_jsonl(path)? {
        let id = question_id(path, line, &v)?;
        let turns = match (v.get("turns"), v.get("text")) {
            (Some(turns), _) => string_list(path, line, "turns", turns)?,
            (None, Some(Value::String(text))) => vec![text.clone()],
            _ => return Err(line_error(path, line, "no `turns` (list of strings) or `text`".into())),
        };
        let category = match v.get("category") {
            None | Some(Value::Null) => "general".to_string(),
            Some(Value::String(c)) => c.clone(),
            Some(other) => return Err(line_error(path, line, format!("category must be a string, not {other}"))),
        };
        if let Some(first) = seen.insert(id.clone(), line) {
            return Err(line_error(path, line, format!("question_id {id} repeats line {first}")));
        }
        questions.push(Question { id, category, turns });
    }
    if questions.is_empty() {
        return Err(JudgeError::File { path: path.to_path_buf(), reason: "no questions".into() });
    }
    Ok(questions)
}

/// Reads an answer file and checks it against `questions`: one answer per question, no answers to other
/// questions, as many turns as the question has.
pub fn read_answers(path: &Path, questions: &[Question]) -> Result<AnswerSet, JudgeError> {
    let by_id: BTreeMap<&QuestionId, &Question> = questions.iter().map(|q| (&q.id, q)).collect();
    let mut name: Option<(String, usize)> = None;
    let mut answers = BTreeMap::new();
    for (line, v) in read_jsonl(path)? {
        let id = question_id(path, line, &v)?;
        let Some(question) = by_id.get(&id) else {
            return Err(line_error(path, line, format!("question_id {id} is not in the question file")));
        };
        let turns = match (v.get("choices"), v.get("text")) {
            (Some(choices), _) => {
                let first = choices
                    .as_array()
                    .and_then(|c| c.first())
                    .ok_or_else(|| line_error(path, line, "choices must be a non-empty list".into()))?;
                let turns =
                    first.get("turns").ok_or_else(|| line_error(path, line, "choices[0] has no turns".into()))?;
                string_list(path, line, "choices[0].turns", turns)?
            }
            (None, Some(Value::String(text))) => vec![text.clone()],
            _ => return Err(line_error(path, line, "no `choices[0].turns` or `text`".into())),
        };
        if turns.len() < question.turns.len() {
            return Err(line_error(
                path,
                line,
                format!("{} answer turns for question {id}, which has {}", turns.len(), question.turns.len()),
            ));
        }
        match (v.get("model_id").and_then(Value::as_str), &name) {
            (Some(m), None) => name = Some((m.to_string(), line)),
            (Some(m), Some((first, first_line))) if m != first => {
                return Err(line_error(
                    path,
                    line,
                    format!("model_id `{m}` differs from `{first}` on line {first_line}"),
                ));
            }
            _ => {}
        }
        if let Some(previous) = answers.insert(id.clone(), Answer { turns, line }) {
            return Err(line_error(
                path,
                line,
                format!("a second answer to question {id} (first on line {})", previous.line),
            ));
        }
    }
    let missing: Vec<String> =
        questions.iter().filter(|q| !answers.contains_key(&q.id)).map(|q| q.id.to_string()).collect();
    if !missing.is_empty() {
        let shown = missing.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
        let more = if missing.len() > 8 { format!(" and {} more", missing.len() - 8) } else { String::new() };
        return Err(JudgeError::File {
            path: path.to_path_buf(),
            reason: format!("no answer to question {shown}{more} of the question file"),
        });
    }
    let name = match name {
        Some((n, _)) => n,
        None => path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "answers".into()),
    };
    Ok(AnswerSet { name, path: path.to_path_buf(), answers })
}

/// Reads a battle file.
pub fn read_battles(path: &Path) -> Result<Vec<Battle>, JudgeError> {
    let mut battles = Vec::new();
    for (line, v) in read_jsonl(path)? {
        let battle: Battle =
            serde_json::from_value(v).map_err(|e| line_error(path, line, format!("not a battle: {e}")))?;
        if battle.model_a == battle.model_b {
            return Err(line_error(path, line, format!("`{}` battles itself", battle.model_a)));
        }
        battles.push(battle);
    }
    if battles.is_empty() {
        return Err(JudgeError::File { path: path.to_path_buf(), reason: "no battles".into() });
    }
    Ok(battles)
}

/// One answer line as `qlora answer` writes it: FastChat's model-answer form plus how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerRecord {
    pub question_id: QuestionId,
    pub answer_id: String,
    pub model_id: String,
    pub choices: Vec<Choice>,
    pub tstamp: f64,
    /// The model, adapter or endpoint, and the sampling settings of this answer.
    pub generation: Value,
}

/// One choice of an answer: the assistant's turns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub index: usize,
    pub turns: Vec<String>,
}

/// The questions already answered in an answer file being written (for resuming), and the system named
/// there. A line cut short by an interrupted write is removed from the file first.
pub fn answered_so_far(path: &Path) -> Result<(Vec<QuestionId>, Option<String>), JudgeError> {
    let mut bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), None)),
        Err(e) => return Err(JudgeError::io(path)(e)),
    };
    if !bytes.is_empty() && !bytes.ends_with(b"\n") {
        let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        bytes.truncate(keep);
        let f = std::fs::OpenOptions::new().write(true).open(path).map_err(JudgeError::io(path))?;
        f.set_len(keep as u64).map_err(JudgeError::io(path))?;
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| JudgeError::File { path: path.to_path_buf(), reason: "not UTF-8".into() })?;
    let mut ids = Vec::new();
    let mut name: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: AnswerRecord =
            serde_json::from_str(line).map_err(|e| line_error(path, i + 1, format!("not an answer line: {e}")))?;
        match &name {
            Some(n) if *n != record.model_id => {
                return Err(line_error(path, i + 1, format!("model_id `{}` differs from `{n}`", record.model_id)));
            }
            _ => name = Some(record.model_id.clone()),
        }
        ids.push(record.question_id);
    }
    Ok((ids, name))
}

/// Writes `text` to `path` through a temporary file and a rename, so a reader never sees half of it.
pub fn write_atomically(path: &Path, text: &str) -> Result<(), JudgeError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let tmp = path.with_file_name(format!(".{name}.partial"));
    std::fs::write(&tmp, text).map_err(JudgeError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(JudgeError::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_fastchat_and_vicuna_table_questions() {
        let dir = tempfile::tempdir().unwrap();
        let q = file(
            &dir,
            "q.jsonl",
            "{\"question_id\": 1, \"category\": \"generic\", \"turns\": [\"Hi?\"]}\n\n\
             {\"question_id\": \"x\", \"text\": \"Old form\"}\n",
        );
        let qs = read_questions(&q).unwrap();
        assert_eq!(qs.len(), 2);
        assert_eq!(qs[0], Question { id: QuestionId::Int(1), category: "generic".into(), turns: vec!["Hi?".into()] });
        assert_eq!(qs[1].category, "general");
        assert_eq!(qs[1].turns, vec!["Old form".to_string()]);
    }

    #[test]
    fn bad_question_lines_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        for (text, line, why) in [
            (
                "{\"question_id\": 1, \"turns\": [\"a\"]}\n{\"question_id\": 1, \"turns\": [\"b\"]}\n",
                2,
                "repeats line 1",
            ),
            ("{\"question_id\": 1, \"turns\": [\"a\"]}\n{oops\n", 2, "not JSON"),
            ("{\"turns\": [\"a\"]}\n", 1, "no question_id"),
            ("{\"question_id\": 1, \"turns\": []}\n", 1, "turns is empty"),
            ("{\"question_id\": 1.5, \"turns\": [\"a\"]}\n", 1, "integer or a string"),
        ] {
            let q = file(&dir, "q.jsonl", text);
            let e = read_questions(&q).unwrap_err().to_string();
            assert!(e.contains(&format!("q.jsonl:{line}: ")) && e.contains(why), "{e}");
        }
    }

    #[test]
    fn answers_must_match_the_questions() {
        let dir = tempfile::tempdir().unwrap();
        let q = file(
            &dir,
            "q.jsonl",
            "{\"question_id\": 1, \"turns\": [\"a\"]}\n{\"question_id\": 2, \"turns\": [\"b\"]}\n",
        );
        let qs = read_questions(&q).unwrap();
        let ok = file(
            &dir,
            "sys.jsonl",
            "{\"question_id\": 2, \"model_id\": \"m\", \"choices\": [{\"index\": 0, \"turns\": [\"B\"]}]}\n\
             {\"question_id\": 1, \"text\": \"A\"}\n",
        );
        let set = read_answers(&ok, &qs).unwrap();
        assert_eq!(set.name, "m");
        assert_eq!(set.answers[&QuestionId::Int(1)].turns, vec!["A".to_string()]);
        let stem = file(
            &dir,
            "stem-name.jsonl",
            "{\"question_id\": 2, \"text\": \"B\"}\n{\"question_id\": 1, \"text\": \"A\"}\n",
        );
        assert_eq!(read_answers(&stem, &qs).unwrap().name, "stem-name");

        for (text, why) in [
            ("{\"question_id\": 1, \"text\": \"A\"}\n", "no answer to question 2"),
            ("{\"question_id\": 3, \"text\": \"A\"}\n", "a.jsonl:1: question_id 3 is not in"),
            (
                "{\"question_id\": 1, \"text\": \"A\"}\n{\"question_id\": 1, \"text\": \"A\"}\n",
                "a.jsonl:2: a second answer",
            ),
            (
                "{\"question_id\": 1, \"text\": \"A\", \"model_id\": \"x\"}\n{\"question_id\": 2, \"text\": \"A\", \"model_id\": \"y\"}\n",
                "a.jsonl:2: model_id `y` differs",
            ),
            ("{\"question_id\": 1, \"choices\": []}\n", "a.jsonl:1: choices must be"),
        ] {
            let a = file(&dir, "a.jsonl", text);
            let e = read_answers(&a, &qs).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn resumes_an_answer_file_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let record = AnswerRecord {
            question_id: QuestionId::Int(7),
            answer_id: "m-7".into(),
            model_id: "m".into(),
            choices: vec![Choice { index: 0, turns: vec!["hi".into()] }],
            tstamp: 1.0,
            generation: serde_json::json!({"temperature": 0.7}),
        };
        let line = serde_json::to_string(&record).unwrap();
        let p = file(&dir, "out.jsonl", &format!("{line}\n{}", &line[..20]));
        let (ids, name) = answered_so_far(&p).unwrap();
        assert_eq!((ids, name.as_deref()), (vec![QuestionId::Int(7)], Some("m")));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("{line}\n"));
        // What `qlora answer` writes, `judge` reads.
        let q = file(&dir, "q.jsonl", "{\"question_id\": 7, \"turns\": [\"hello?\"]}\n");
        let set = read_answers(&p, &read_questions(&q).unwrap()).unwrap();
        assert_eq!(set.name, "m");
        assert_eq!(answered_so_far(&dir.path().join("none.jsonl")).unwrap().0, vec![]);
    }

    #[test]
    fn reads_battles_in_fastchat_form() {
        let dir = tempfile::tempdir().unwrap();
        let b = file(
            &dir,
            "b.jsonl",
            "{\"question_id\": 1, \"model_a\": \"x\", \"model_b\": \"y\", \"winner\": \"model_a\", \"judge\": \"j\"}\n\
             {\"question_id\": 2, \"model_a\": \"x\", \"model_b\": \"y\", \"winner\": \"tie (bothbad)\"}\n",
        );
        let battles = read_battles(&b).unwrap();
        assert_eq!(battles[0].winner, Winner::ModelA);
        assert_eq!(battles[1].winner, Winner::Tie);
        let bad =
            file(&dir, "c.jsonl", "{\"question_id\": 1, \"model_a\": \"x\", \"model_b\": \"y\", \"winner\": \"x\"}\n");
        assert!(read_battles(&bad).unwrap_err().to_string().contains("c.jsonl:1: not a battle"));
    }
}
