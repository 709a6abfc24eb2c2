//! Reading a judgment, and the two-order rule.
//!
//! A judgment that does not say clearly what it means is an [`Verdict::Error`], kept and counted, never
//! guessed. FastChat's `[[A]]` reader takes the first of `[[A]]`, `[[B]]`, `[[C]]` that occurs anywhere
//! (so a judgment naming both is read as A); here a judgment naming more than one of them is an error.

use serde::{Deserialize, Serialize};

use crate::files::Winner;
use crate::prompt::OutputFormat;

/// One pairwise judgment, in the judge's own labels: A is the answer shown first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    A,
    B,
    #[serde(rename = "tie")]
    Tie,
    /// The judgment could not be read.
    #[serde(rename = "error")]
    Error,
}

/// Reads a pairwise judgment in `format` (`[[A]]` or `last-line-123`).
pub fn parse_pairwise(format: OutputFormat, judgment: &str) -> Verdict {
    match format {
        OutputFormat::Brackets => {
            let found: Vec<Verdict> = [("[[A]]", Verdict::A), ("[[B]]", Verdict::B), ("[[C]]", Verdict::Tie)]
                .into_iter()
                .filter(|(mark, _)| judgment.contains(mark))
                .map(|(_, v)| v)
                .collect();
            match found.as_slice() {
                [one] => *one,
                _ => Verdict::Error,
            }
        }
        OutputFormat::LastLine123 => match judgment.trim().lines().last().map(str::trim) {
            Some("1") => Verdict::A,
            Some("2") => Verdict::B,
            Some("3") => Verdict::Tie,
            _ => Verdict::Error,
        },
        OutputFormat::ScorePair => Verdict::Error,
    }
}

/// Reads the two 1–10 scores from the first line (`8 7`, `8, 7`, `8.5 7`), as qlora's `parse_score`
/// does; `None` when the line holds anything else or a score outside 0–10.
pub fn parse_scores(judgment: &str) -> Option<[f64; 2]> {
    let first = judgment.trim_start().lines().next()?.replace(',', " ");
    let values: Vec<f64> = first.split_whitespace().map(str::parse::<f64>).collect::<Result<_, _>>().ok()?;
    match values.as_slice() {
        [a, b] if (0.0..=10.0).contains(a) && (0.0..=10.0).contains(b) => Some([*a, *b]),
        _ => None,
    }
}

/// The battle outcome between systems 1 and 2 from the judgment with 1 shown first (`g1`) and the one
/// with 2 shown first (`g2`): agreeing verdicts stand, disagreeing ones are a tie (the paper's rule), and
/// an unreadable judgment in either order leaves no outcome (`None`).
pub fn combine(g1: Verdict, g2: Verdict) -> Option<Winner> {
    let as_winner_1 = |v: Verdict| match v {
        Verdict::A => Some(Winner::ModelA),
        Verdict::B => Some(Winner::ModelB),
        Verdict::Tie => Some(Winner::Tie),
        Verdict::Error => None,
    };
    let first = as_winner_1(g1)?;
    // In the second order system 2 was A.
    let second = match as_winner_1(g2)? {
        Winner::ModelA => Winner::ModelB,
        Winner::ModelB => Winner::ModelA,
        Winner::Tie => Winner::Tie,
    };
    Some(if first == second { first } else { Winner::Tie })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brackets() {
        let p = |t| parse_pairwise(OutputFormat::Brackets, t);
        assert_eq!(p("A is more detailed.\n\n[[A]]"), Verdict::A);
        assert_eq!(p("Final verdict: [[B]]"), Verdict::B);
        assert_eq!(p("[[C]]"), Verdict::Tie);
        assert_eq!(p("[[B]] ... in the end [[B]]"), Verdict::B);
        assert_eq!(p("Both are fine."), Verdict::Error);
        assert_eq!(p("[[A]] or [[B]]? I cannot decide."), Verdict::Error);
        assert_eq!(p("[A]"), Verdict::Error);
    }

    #[test]
    fn last_line() {
        let p = |t| parse_pairwise(OutputFormat::LastLine123, t);
        assert_eq!(p("Assistant 1 was better.\n1"), Verdict::A);
        assert_eq!(p("explanation\n 2 \n\n"), Verdict::B);
        assert_eq!(p("3"), Verdict::Tie);
        assert_eq!(p("explanation\n4"), Verdict::Error);
        assert_eq!(p("1\nthen more text"), Verdict::Error);
        assert_eq!(p(""), Verdict::Error);
    }

    #[test]
    fn score_pairs() {
        assert_eq!(parse_scores("8 7\nAssistant 1 ..."), Some([8.0, 7.0]));
        assert_eq!(parse_scores("\n 9, 6.5\n"), Some([9.0, 6.5]));
        assert_eq!(parse_scores("Scores: 8 7"), None);
        assert_eq!(parse_scores("8 7 6"), None);
        assert_eq!(parse_scores("8"), None);
        assert_eq!(parse_scores("11 7"), None);
        assert_eq!(parse_scores(""), None);
    }

    #[test]
    fn two_orders() {
        use Verdict::*;
        // Agreeing: 1 wins when it is A first and B second.
        assert_eq!(combine(A, B), Some(Winner::ModelA));
        assert_eq!(combine(B, A), Some(Winner::ModelB));
        assert_eq!(combine(Tie, Tie), Some(Winner::Tie));
        // Position bias (always A) or any disagreement: a tie.
        assert_eq!(combine(A, A), Some(Winner::Tie));
        assert_eq!(combine(B, B), Some(Winner::Tie));
        assert_eq!(combine(A, Tie), Some(Winner::Tie));
        assert_eq!(combine(Tie, A), Some(Winner::Tie));
        // Unreadable in either order: no battle.
        assert_eq!(combine(Error, A), None);
        assert_eq!(combine(B, Error), None);
    }
}
