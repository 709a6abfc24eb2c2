//! Judge prompts: JSON files in FastChat's `judge_prompts.jsonl` shape, so the user can replace them.
//!
//! ```json
//! {"name": "pair-v2", "type": "pairwise", "system_prompt": "...", "prompt_template": "[User Question]\n{question}...",
//!  "output_format": "[[A]]", "defaults": {}}
//! ```
//!
//! `prompt_template` names `{question}`, `{answer_a}` and `{answer_b}` (`{answer_1}` / `{answer_2}`, as in
//! qlora's and FastChat's older files, mean the same), plus any key of `defaults`; `{{` and `}}` are
//! literal braces (Python's `str.format`). The template is filled in one pass, so braces inside an answer
//! are never read as placeholders. `output_format` says how the judgment is read ([`crate::verdict`]):
//! `[[A]]` (FastChat's three-class verdict), `last-line-123` (qlora's `eval_gpt_review.py`: the last line
//! is 1, 2 or 3), or `score-pair` (the first line holds the two 1–10 scores; `type` must be `score`).
//!
//! An optional `examples` list (`[{"user", "assistant"}]`, our extension) is sent as earlier turns before
//! the question: worked examples that make a small judge answer in the asked format.
//!
//! The built-in prompts live in `crates/judge/prompts/` (see its README for where each comes from).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::JudgeError;

/// FastChat's `pair-v2` pairwise prompt (`[[A]]`, `[[B]]`, `[[C]]`).
pub const PAIRWISE: &str = include_str!("../prompts/pair-v2.json");
/// qlora's three-class Vicuna prompt (last line 1, 2 or 3).
pub const QLORA_THREECLASS: &str = include_str!("../prompts/qlora-threeclass.json");
/// The Vicuna benchmark's 1–10 scoring prompt (first line: two scores).
pub const SCORE: &str = include_str!("../prompts/score-v1.json");

/// What a prompt asks the judge for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptKind {
    /// Which of two answers is better (or a tie).
    Pairwise,
    /// A 1–10 score for each of two answers.
    Score,
}

/// How a judgment is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputFormat {
    #[serde(rename = "[[A]]")]
    Brackets,
    #[serde(rename = "last-line-123")]
    LastLine123,
    #[serde(rename = "score-pair")]
    ScorePair,
}

/// A judge prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgePrompt {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: PromptKind,
    pub system_prompt: String,
    pub prompt_template: String,
    pub output_format: OutputFormat,
    #[serde(default)]
    pub defaults: BTreeMap<String, String>,
    /// Worked examples sent before the question as earlier turns of the conversation (ours, not
    /// FastChat's): a small judge follows the verdict format when it has seen it answered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<FewShot>,
}

/// One worked example of a judge prompt: a user turn and the judge's reply to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FewShot {
    pub user: String,
    pub assistant: String,
}

impl JudgePrompt {
    /// Parses and checks a prompt (`origin` names it in errors).
    pub fn parse(text: &str, origin: &str) -> Result<JudgePrompt, JudgeError> {
        let bad = |reason: String| JudgeError::Input(format!("judge prompt {origin}: {reason}"));
        let prompt: JudgePrompt = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        match (prompt.kind, prompt.output_format) {
            (PromptKind::Pairwise, OutputFormat::Brackets | OutputFormat::LastLine123) => {}
            (PromptKind::Score, OutputFormat::ScorePair) => {}
            (kind, format) => return Err(bad(format!("output_format {format:?} does not fit type {kind:?}"))),
        }
        // Every placeholder must be known, and the three inputs must all appear.
        let mut seen = Vec::new();
        render(&prompt.prompt_template, |name| {
            seen.push(name.to_string());
            Some(String::new())
        })
        .map_err(bad)?;
        for name in &seen {
            if canonical(name).is_none() && !prompt.defaults.contains_key(name) {
                return Err(bad(format!("unknown placeholder {{{name}}}")));
            }
        }
        for needed in ["question", "answer_a", "answer_b"] {
            if !seen.iter().any(|n| canonical(n) == Some(needed)) {
                return Err(bad(format!("prompt_template has no {{{needed}}}")));
            }
        }
        Ok(prompt)
    }

    /// Reads a prompt file.
    pub fn from_file(path: &Path) -> Result<JudgePrompt, JudgeError> {
        let text = std::fs::read_to_string(path).map_err(JudgeError::io(path))?;
        JudgePrompt::parse(&text, &path.display().to_string())
    }

    /// The built-in prompt of `kind`.
    pub fn builtin(kind: PromptKind) -> JudgePrompt {
        let text = match kind {
            PromptKind::Pairwise => PAIRWISE,
            PromptKind::Score => SCORE,
        };
        JudgePrompt::parse(text, "(built in)").expect("built-in prompt")
    }

    /// The user message for `question` with answer A (Assistant 1) and answer B (Assistant 2).
    pub fn user_message(&self, question: &str, answer_a: &str, answer_b: &str) -> String {
        render(&self.prompt_template, |name| match canonical(name) {
            Some("question") => Some(question.to_string()),
            Some("answer_a") => Some(answer_a.to_string()),
            Some("answer_b") => Some(answer_b.to_string()),
            _ => self.defaults.get(name).cloned(),
        })
        .expect("checked when the prompt was parsed")
    }
}

fn canonical(name: &str) -> Option<&'static str> {
    match name {
        "question" => Some("question"),
        "answer_a" | "answer_1" => Some("answer_a"),
        "answer_b" | "answer_2" => Some("answer_b"),
        _ => None,
    }
}

/// Fills `{name}` placeholders from `value` in one pass; `{{` / `}}` are literal braces.
fn render(template: &str, mut value: impl FnMut(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(pos) = rest.find(['{', '}']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push(tail.as_bytes()[0] as char);
            rest = &tail[2..];
        } else if tail.starts_with('}') {
            return Err("a lone `}` (write `}}` for a brace)".into());
        } else {
            let end = tail.find('}').ok_or("an unclosed `{` (write `{{` for a brace)")?;
            let name = &tail[1..end];
            out.push_str(&value(name).ok_or_else(|| format!("unknown placeholder {{{name}}}"))?);
            rest = &tail[end + 1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_prompts_parse_and_fill() {
        let p = JudgePrompt::builtin(PromptKind::Pairwise);
        assert_eq!(p.name, "pair-v2");
        assert_eq!(p.output_format, OutputFormat::Brackets);
        let m = p.user_message("Q?", "first {answer_b}", "second");
        assert!(m.contains("[User Question]\nQ?\n"), "{m}");
        assert!(m.contains("[The Start of Assistant A's Answer]\nfirst {answer_b}\n"), "{m}");
        assert!(m.contains("[The Start of Assistant B's Answer]\nsecond\n"), "{m}");
        let s = JudgePrompt::builtin(PromptKind::Score);
        assert_eq!(s.output_format, OutputFormat::ScorePair);
        let m = s.user_message("Q?", "one", "two");
        assert!(m.contains("Assistant 1's Answer]\none\n") && m.contains("scale of 1 to 10"), "{m}");
        let q = JudgePrompt::parse(QLORA_THREECLASS, "qlora").unwrap();
        assert_eq!(q.output_format, OutputFormat::LastLine123);
        assert!(q.user_message("Q?", "one", "two").contains("outputting the number 1 or 2"));
        assert!(p.examples.is_empty() && s.examples.is_empty());
        // Worked examples, our extension, are read in order.
        let shots = JudgePrompt::parse(
            r#"{"name": "x", "type": "pairwise", "system_prompt": "s", "prompt_template": "{question} {answer_a} {answer_b}",
                "output_format": "[[A]]", "examples": [{"user": "2+2? 4 5", "assistant": "[[A]]"}, {"user": "b", "assistant": "[[C]]"}]}"#,
            "x",
        )
        .unwrap();
        assert_eq!(shots.examples[1], FewShot { user: "b".into(), assistant: "[[C]]".into() });
    }

    #[test]
    fn rejects_broken_prompts() {
        let base = |template: &str, format: &str, kind: &str| {
            format!(
                r#"{{"name": "t", "type": "{kind}", "system_prompt": "s", "prompt_template": "{template}", "output_format": "{format}"}}"#
            )
        };
        for (text, why) in [
            (base("{question} {answer_a}", "[[A]]", "pairwise"), "no {answer_b}"),
            (base("{question} {answer_a} {answer_b} {nope}", "[[A]]", "pairwise"), "unknown placeholder {nope}"),
            (base("{question} {answer_a} {answer_b", "[[A]]", "pairwise"), "unclosed"),
            (base("{question} {answer_a} {answer_b}", "score-pair", "pairwise"), "does not fit"),
            (base("{question} {answer_a} {answer_b}", "[[A]]", "score"), "does not fit"),
        ] {
            let e = JudgePrompt::parse(&text, "t.json").unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
        let ok = base("{{literal}} {question} {answer_1} {answer_2}", "[[A]]", "pairwise");
        assert_eq!(JudgePrompt::parse(&ok, "t").unwrap().user_message("q", "a", "b"), "{literal} q a b");
    }
}
