//! Reading JSONL datasets into examples: text segments, each trainable (target) or not (source).

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::DataError;

/// The dataset formats we read. `Auto` looks at the keys of each line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFormat {
    Auto,
    /// `instruction`, optional `input`, `output` (Stanford Alpaca), with the Alpaca prompt as QLoRA builds it.
    Alpaca,
    /// OpenAssistant OASST1: message trees (one tree per line with `prompt.replies`, or one message per line
    /// with `message_id` / `parent_id`), rendered as Guanaco's `### Human: … ### Assistant: …`.
    #[serde(alias = "oasst1", alias = "guanaco")]
    Oasst,
    /// `messages`: `[{role, content}]`, rendered with the model's chat template.
    #[serde(alias = "messages")]
    Chat,
    /// `text`: loss on every token.
    Text,
    /// `input`, `output`: a source and a target as they are (no prompt template), the form of seq2seq data
    /// (QLoRA's `input-output`).
    #[serde(rename = "input-output", alias = "input_output")]
    InputOutput,
}

impl std::fmt::Display for DatasetFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DatasetFormat::Auto => "auto",
            DatasetFormat::Alpaca => "alpaca",
            DatasetFormat::Oasst => "oasst",
            DatasetFormat::Chat => "chat",
            DatasetFormat::Text => "text",
            DatasetFormat::InputOutput => "input-output",
        })
    }
}

impl std::str::FromStr for DatasetFormat {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self, DataError> {
        match s {
            "auto" => Ok(DatasetFormat::Auto),
            "alpaca" => Ok(DatasetFormat::Alpaca),
            "oasst" | "oasst1" | "guanaco" => Ok(DatasetFormat::Oasst),
            "chat" | "messages" => Ok(DatasetFormat::Chat),
            "text" => Ok(DatasetFormat::Text),
            "input-output" | "input_output" => Ok(DatasetFormat::InputOutput),
            other => Err(DataError::UnknownFormat(format!(
                "`{other}` (expected auto, alpaca, oasst, chat, text or input-output)"
            ))),
        }
    }
}

/// A chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub role: String,
    pub content: String,
}

/// One example before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// Prompt and response (Alpaca): QLoRA tokenizes `bos + source` and `target + eos` separately and
    /// truncates each to its own limit.
    SourceTarget { source: String, target: String },
    /// A conversation: alternating untrained (`false`) and trained (`true`) text segments, whole text
    /// truncated to the sum of both limits.
    Segments { segments: Vec<(String, bool)>, add_bos: bool },
    /// Chat messages for the model's template.
    Chat { turns: Vec<Turn> },
}

/// What reading a file produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadReport {
    pub examples: Vec<Example>,
    /// 1-based line numbers of malformed lines that were skipped (only with `skip_bad_lines`).
    pub skipped_lines: Vec<(usize, String)>,
}

const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: ";
const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: ";

fn string_field<'a>(obj: &'a serde_json::Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("`{key}` must be a string, found {}", kind(other))),
        None => Err(format!("missing `{key}`")),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn detect(obj: &serde_json::Map<String, Value>) -> Option<DatasetFormat> {
    if obj.contains_key("messages") {
        Some(DatasetFormat::Chat)
    } else if obj.contains_key("instruction") && obj.contains_key("output") {
        Some(DatasetFormat::Alpaca)
    } else if obj.contains_key("message_id") || obj.get("prompt").is_some_and(Value::is_object) {
        Some(DatasetFormat::Oasst)
    } else if obj.contains_key("text") {
        Some(DatasetFormat::Text)
    } else if obj.contains_key("input") && obj.contains_key("output") {
        Some(DatasetFormat::InputOutput)
    } else {
        None
    }
}

fn alpaca(obj: &serde_json::Map<String, Value>) -> Result<Example, String> {
    let instruction = string_field(obj, "instruction")?;
    let input = match obj.get("input") {
        None | Some(Value::Null) => "",
        Some(_) => string_field(obj, "input")?,
    };
    let output = string_field(obj, "output")?;
    let source = if input.is_empty() {
        ALPACA_NO_INPUT.replace("{instruction}", instruction)
    } else {
        ALPACA_WITH_INPUT.replace("{instruction}", instruction).replace("{input}", input)
    };
    Ok(Example::SourceTarget { source, target: output.to_string() })
}

fn chat(obj: &serde_json::Map<String, Value>) -> Result<Example, String> {
    let turns: Vec<Turn> = serde_json::from_value(obj.get("messages").cloned().unwrap_or(Value::Null))
        .map_err(|e| format!("`messages` must be a list of {{\"role\", \"content\"}} objects: {e}"))?;
    if !turns.iter().any(|t| t.role == "assistant") {
        return Err("`messages` has no assistant turn to learn from".into());
    }
    if let Some(t) = turns.iter().find(|t| !["system", "user", "assistant"].contains(&t.role.as_str())) {
        return Err(format!("unknown role `{}` (expected system, user or assistant)", t.role));
    }
    Ok(Example::Chat { turns })
}

/// Guanaco's rendering of a thread: `### Human: {text}### Assistant: {text}…`, assistant texts trained.
fn guanaco(thread: &[(String, String)]) -> Result<Example, String> {
    let mut segments = Vec::new();
    for (role, text) in thread {
        match role.as_str() {
            "prompter" | "user" => segments.push((format!("### Human: {text}### Assistant: "), false)),
            "assistant" => segments.push((text.clone(), true)),
            other => return Err(format!("unknown OASST role `{other}` (expected prompter or assistant)")),
        }
    }
    if !segments.iter().any(|s| s.1) {
        return Err("the conversation has no assistant reply".into());
    }
    Ok(Example::Segments { segments, add_bos: true })
}

/// The top-ranked thread of a tree export line (`{"prompt": {"role", "text", "replies": [...]}}`): at each level
/// the reply with the lowest `rank` (unranked replies last, then file order), as Guanaco's selection.
fn oasst_tree(obj: &serde_json::Map<String, Value>) -> Result<Example, String> {
    let mut thread = Vec::new();
    let mut node = obj.get("prompt").and_then(Value::as_object).ok_or("missing `prompt` object")?;
    loop {
        thread.push((string_field(node, "role")?.to_string(), string_field(node, "text")?.to_string()));
        let replies = match node.get("replies") {
            Some(Value::Array(r)) if !r.is_empty() => r,
            _ => break,
        };
        let best = replies
            .iter()
            .filter_map(Value::as_object)
            .min_by(|a, b| rank_of(a).total_cmp(&rank_of(b)))
            .ok_or("`replies` must hold message objects")?;
        node = best;
    }
    // A thread ends on an assistant reply.
    while thread.last().is_some_and(|(role, _)| role != "assistant") {
        thread.pop();
    }
    guanaco(&thread)
}

fn rank_of(m: &serde_json::Map<String, Value>) -> f64 {
    m.get("rank").and_then(Value::as_f64).unwrap_or(f64::INFINITY)
}

/// Message rows (`message_id`, `parent_id`, `role`, `text`, `rank`) → one top-ranked thread per root.
fn oasst_rows(rows: Vec<(usize, serde_json::Map<String, Value>)>) -> Result<Vec<Example>, DataError> {
    struct Msg {
        line: usize,
        role: String,
        text: String,
        rank: f64,
        children: Vec<usize>,
    }
    let mut msgs: Vec<Msg> = Vec::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut parents = Vec::new();
    for (line, row) in &rows {
        let bad = |reason: String| DataError::Line { file: String::new(), line: *line, reason };
        let id = string_field(row, "message_id").map_err(bad)?;
        let parent = match row.get("parent_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) => Some(p.clone()),
            Some(other) => return Err(bad(format!("`parent_id` must be a string or null, found {}", kind(other)))),
        };
        let msg = Msg {
            line: *line,
            role: string_field(row, "role").map_err(bad)?.to_string(),
            text: string_field(row, "text").map_err(bad)?.to_string(),
            rank: rank_of(row),
            children: Vec::new(),
        };
        if ids.insert(id.to_string(), msgs.len()).is_some() {
            return Err(bad(format!("duplicate message_id {id}")));
        }
        msgs.push(msg);
        parents.push(parent);
    }
    let mut roots = Vec::new();
    for (i, parent) in parents.iter().enumerate() {
        match parent {
            None => roots.push(i),
            Some(p) => match ids.get(p) {
                Some(&pi) => msgs[pi].children.push(i),
                None => {
                    return Err(DataError::Line {
                        file: String::new(),
                        line: msgs[i].line,
                        reason: format!("parent_id {p} is not in the file"),
                    });
                }
            },
        }
    }
    let mut out = Vec::new();
    for root in roots {
        let mut thread = vec![(msgs[root].role.clone(), msgs[root].text.clone())];
        let mut node = root;
        while let Some(&best) = msgs[node].children.iter().min_by(|&&a, &&b| msgs[a].rank.total_cmp(&msgs[b].rank)) {
            thread.push((msgs[best].role.clone(), msgs[best].text.clone()));
            node = best;
        }
        while thread.last().is_some_and(|(role, _)| role != "assistant") {
            thread.pop();
        }
        if thread.is_empty() {
            continue; // a prompt nobody answered
        }
        out.push(guanaco(&thread).map_err(|reason| DataError::Line {
            file: String::new(),
            line: msgs[root].line,
            reason,
        })?);
    }
    Ok(out)
}

/// Parses JSONL `text` (from `file`, for messages). Malformed lines stop with an error naming the line, or are
/// skipped and reported with `skip_bad_lines`. An empty result is an error.
pub fn parse_jsonl(
    text: &str,
    file: &str,
    format: DatasetFormat,
    skip_bad_lines: bool,
) -> Result<ReadReport, DataError> {
    let mut examples = Vec::new();
    let mut skipped = Vec::new();
    let mut oasst_message_rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Result<Example, String> = (|| {
            let value: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
            let obj = value.as_object().ok_or_else(|| format!("expected a JSON object, found {}", kind(&value)))?;
            let line_format = match format {
                DatasetFormat::Auto => detect(obj).ok_or_else(|| {
                    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
                    format!("unknown format: keys {keys:?} (expected messages, instruction/output, text, input/output, or an OASST message/tree)")
                })?,
                f => f,
            };
            match line_format {
                DatasetFormat::Alpaca => alpaca(obj),
                DatasetFormat::Chat => chat(obj),
                DatasetFormat::Text => Ok(Example::Segments {
                    segments: vec![(string_field(obj, "text")?.to_string(), true)],
                    add_bos: true,
                }),
                DatasetFormat::Oasst if obj.contains_key("message_id") => {
                    oasst_message_rows.push((number, obj.clone()));
                    Err(String::new()) // collected; assembled below
                }
                DatasetFormat::Oasst => oasst_tree(obj),
                DatasetFormat::InputOutput => Ok(Example::SourceTarget {
                    source: string_field(obj, "input")?.to_string(),
                    target: string_field(obj, "output")?.to_string(),
                }),
                DatasetFormat::Auto => unreachable!(),
            }
        })();
        match parsed {
            Ok(example) => examples.push(example),
            Err(reason) if reason.is_empty() => {}
            Err(reason) if skip_bad_lines => skipped.push((number, reason)),
            Err(reason) => return Err(DataError::Line { file: file.to_string(), line: number, reason }),
        }
    }
    if !oasst_message_rows.is_empty() {
        let threads = oasst_rows(oasst_message_rows).map_err(|e| match e {
            DataError::Line { line, reason, .. } => DataError::Line { file: file.to_string(), line, reason },
            other => other,
        })?;
        examples.extend(threads);
    }
    if examples.is_empty() {
        return Err(DataError::Empty { file: file.to_string(), skipped: skipped.len() });
    }
    Ok(ReadReport { examples, skipped_lines: skipped })
}

/// Reads a JSONL file.
pub fn read_jsonl(path: &Path, format: DatasetFormat, skip_bad_lines: bool) -> Result<ReadReport, DataError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| DataError::Io { file: file.clone(), reason: e.to_string() })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        DataError::Line { file: file.clone(), line, reason: "not valid UTF-8".into() }
    })?;
    parse_jsonl(&text, &file, format, skip_bad_lines)
}
