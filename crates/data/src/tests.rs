use formats::tokenizer::TextTokenizer;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::*;

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A byte-level tokenizer without merges (one token per byte) plus special tokens.
fn tokenizer() -> TextTokenizer {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let bpe = BPE::builder()
        .vocab_and_merges(
            alphabet
                .into_iter()
                .enumerate()
                .map(|(i, c)| (c.to_string(), i as u32))
                .collect::<tokenizers::models::bpe::Vocab>(),
            vec![],
        )
        .build()
        .unwrap();
    let mut inner = Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, false)));
    inner.with_decoder(Some(ByteLevel::default()));
    inner.add_special_tokens(&["<s>", "</s>", "<|im_start|>", "<|im_end|>"].map(|t| AddedToken::from(t, true)));
    TextTokenizer {
        inner,
        chat_template: Some(CHATML.into()),
        bos_token: Some("<s>".into()),
        eos_token: Some("</s>".into()),
    }
}

fn targets_text(t: &TextTokenizer, e: &TokenizedExample) -> String {
    let ids: Vec<u32> = e.ids.iter().zip(&e.target).filter(|(_, m)| **m).map(|(i, _)| *i).collect();
    t.decode(&ids, false).unwrap()
}

fn sources_text(t: &TextTokenizer, e: &TokenizedExample) -> String {
    let ids: Vec<u32> = e.ids.iter().zip(&e.target).filter(|(_, m)| !**m).map(|(i, _)| *i).collect();
    t.decode(&ids, false).unwrap()
}

#[test]
fn alpaca_prompt_and_mask_follow_qlora() {
    let text = r#"{"instruction": "Name a colour.", "input": "", "output": "Blue."}
{"instruction": "Translate.", "input": "Hallo", "output": "Hello"}"#;
    let report = parse_jsonl(text, "a.jsonl", DatasetFormat::Auto, false).unwrap();
    let Example::SourceTarget { source, target } = &report.examples[0] else { panic!() };
    assert!(
        source.starts_with("Below is an instruction that describes a task. Write")
            && source.ends_with("### Instruction:\nName a colour.\n\n### Response: ")
    );
    assert_eq!(target, "Blue.");
    let Example::SourceTarget { source, .. } = &report.examples[1] else { panic!() };
    assert!(source.contains("### Input:\nHallo\n\n### Response: "));
    let t = tokenizer();
    let out = tokenize_all(&report.examples, &t, &Limits::default()).unwrap();
    assert_eq!(targets_text(&t, &out.examples[0]), "Blue.</s>");
    assert!(sources_text(&t, &out.examples[0]).starts_with("<s>Below is"));
    // Limits cut source and target separately; train_on_source marks everything.
    let limits = Limits { source_max_len: 10, target_max_len: 3, train_on_source: false };
    let out = tokenize_all(&report.examples, &t, &limits).unwrap();
    assert_eq!(out.truncated, 2);
    assert_eq!(out.examples[0].len(), 13);
    assert_eq!(targets_text(&t, &out.examples[0]), "Blu");
    let all = tokenize_all(&report.examples, &t, &Limits { train_on_source: true, ..limits }).unwrap();
    assert!(all.examples[0].target.iter().all(|&m| m));
}

#[test]
fn chat_targets_are_the_assistant_turns_with_their_end_tokens() {
    let text = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao."}]}"#;
    let report = parse_jsonl(text, "c.jsonl", DatasetFormat::Chat, false).unwrap();
    let t = tokenizer();
    let out = tokenize_all(&report.examples, &t, &Limits::default()).unwrap();
    assert_eq!(targets_text(&t, &out.examples[0]), "Hello!<|im_end|>\nCiao.<|im_end|>\n");
    let all: Vec<u32> = out.examples[0].ids.clone();
    assert_eq!(
        t.decode(&all, false).unwrap(),
        t.apply_chat_template(
            &[
                ("system", "Be brief."),
                ("user", "Hi"),
                ("assistant", "Hello!"),
                ("user", "Bye"),
                ("assistant", "Ciao.")
            ]
            .map(|(r, c)| formats::tokenizer::ChatMessage::new(r, c)),
            false
        )
        .unwrap()
    );
}

#[test]
fn oasst_trees_and_rows_become_guanaco_threads_of_top_ranked_replies() {
    let tree = r#"{"message_tree_id": "t", "prompt": {"role": "prompter", "text": "Q1", "replies": [{"role": "assistant", "text": "worse", "rank": 1}, {"role": "assistant", "text": "A1", "rank": 0, "replies": [{"role": "prompter", "text": "Q2", "replies": [{"role": "assistant", "text": "A2"}]}]}]}}"#;
    let rows = r#"{"message_id": "m1", "parent_id": null, "role": "prompter", "text": "Q1"}
{"message_id": "m2", "parent_id": "m1", "role": "assistant", "text": "second", "rank": 1}
{"message_id": "m3", "parent_id": "m1", "role": "assistant", "text": "A1", "rank": 0}
{"message_id": "m4", "parent_id": null, "role": "prompter", "text": "unanswered"}"#;
    let t = tokenizer();
    for (text, format) in [(tree, DatasetFormat::Auto), (rows, DatasetFormat::Oasst)] {
        let report = parse_jsonl(text, "o.jsonl", format, false).unwrap();
        assert_eq!(report.examples.len(), 1, "unanswered prompts are not examples");
        let out = tokenize_all(&report.examples, &t, &Limits::default()).unwrap();
        let all = t.decode(&out.examples[0].ids, false).unwrap();
        assert!(all.starts_with("<s>### Human: Q1### Assistant: A1"), "{all}");
        let expected_targets = if text == tree { "A1A2</s>" } else { "A1</s>" };
        assert_eq!(targets_text(&t, &out.examples[0]), expected_targets);
    }
}

#[test]
fn text_trains_on_every_token() {
    let report = parse_jsonl("{\"text\": \"abc\"}\n", "t.jsonl", DatasetFormat::Auto, false).unwrap();
    let t = tokenizer();
    let out = tokenize_all(&report.examples, &t, &Limits::default()).unwrap();
    assert_eq!(t.decode(&out.examples[0].ids, false).unwrap(), "<s>abc</s>");
    assert_eq!(out.examples[0].target_count(), 4);
}

#[test]
fn bad_lines_are_reported_by_number_or_skipped() {
    let text = "{\"text\": \"ok\"}\n\n{\"text\": 5}\nnot json\n[1]\n{\"foo\": 1}\n{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n";
    let err = parse_jsonl(text, "d.jsonl", DatasetFormat::Auto, false).unwrap_err().to_string();
    assert!(err.starts_with("d.jsonl:3: `text` must be a string"), "{err}");
    let report = parse_jsonl(text, "d.jsonl", DatasetFormat::Auto, true).unwrap();
    assert_eq!(report.examples.len(), 1);
    let lines: Vec<usize> = report.skipped_lines.iter().map(|(l, _)| *l).collect();
    assert_eq!(lines, [3, 4, 5, 6, 7]);
    assert!(report.skipped_lines[3].1.contains("unknown format"));
    assert!(matches!(parse_jsonl("\n\n", "e.jsonl", DatasetFormat::Auto, false), Err(DataError::Empty { .. })));
    assert!(matches!(
        parse_jsonl("bad\n", "e.jsonl", DatasetFormat::Auto, true),
        Err(DataError::Empty { skipped: 1, .. })
    ));
    assert!("yaml".parse::<DatasetFormat>().is_err());
    // Everything truncated away: a clear error, not an empty run.
    let report =
        parse_jsonl(r#"{"instruction": "long prompt", "output": "x"}"#, "l.jsonl", DatasetFormat::Auto, false).unwrap();
    let limits = Limits { source_max_len: 4, target_max_len: 0, train_on_source: false };
    assert!(matches!(
        tokenize_all(&report.examples, &tokenizer(), &limits),
        Err(DataError::NothingToTrain { dropped: 1 })
    ));
    // Invalid UTF-8 names its line.
    let dir = std::env::temp_dir().join(format!("qlora-data-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.jsonl");
    std::fs::write(&path, b"{\"text\": \"a\"}\n{\"text\": \"\xff\"}\n").unwrap();
    let err = read_jsonl(&path, DatasetFormat::Auto, false).unwrap_err().to_string();
    assert!(err.ends_with(":2: not valid UTF-8"), "{err}");
    assert!(read_jsonl(&dir.join("missing.jsonl"), DatasetFormat::Auto, false).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn batches_shift_labels_and_pad_right() {
    let a = TokenizedExample { ids: vec![1, 2, 3, 4], target: vec![false, false, true, true] };
    let b = TokenizedExample { ids: vec![5, 6], target: vec![true, true] };
    let batch = Batch::new(&[&a, &b], 0);
    assert_eq!((batch.batch, batch.len), (2, 4));
    assert_eq!(batch.ids, [1, 2, 3, 4, 5, 6, 0, 0]);
    assert_eq!(batch.labels, [0, 3, 4, 0, 6, 0, 0, 0]);
    assert_eq!(batch.label_mask, [0., 1., 1., 0., 1., 0., 0., 0.]);
    assert_eq!(batch.targets, 3);
}

#[test]
fn epoch_order_is_a_seeded_permutation_and_groups_by_length() {
    let lengths: Vec<usize> = (0..1000).map(|i| (i * 7919) % 311).collect();
    let config = OrderConfig { shuffle: true, seed: 42, group_by_length: false, micro_batch_size: 4 };
    let o1 = epoch_order(&lengths, &config, 0);
    assert_eq!(o1, epoch_order(&lengths, &config, 0));
    assert_ne!(o1, epoch_order(&lengths, &config, 1));
    let mut sorted = o1.clone();
    sorted.sort();
    assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    let plain = epoch_order(&lengths, &OrderConfig { shuffle: false, ..config }, 3);
    assert_eq!(plain, (0..1000).collect::<Vec<_>>());
    let grouped = epoch_order(&lengths, &OrderConfig { group_by_length: true, ..config }, 0);
    assert_eq!(lengths[grouped[0]], *lengths.iter().max().unwrap(), "longest first");
    // Each megabatch (50 micro-batches) is sorted longest first; only heads may have been swapped.
    for mega in grouped.chunks(200) {
        assert!(mega[1..].windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
    }
}

#[test]
fn a_stream_resumed_from_its_cursor_continues_identically() {
    let examples: Vec<TokenizedExample> = (0..23)
        .map(|i| TokenizedExample { ids: vec![i; 1 + i as usize % 5], target: vec![true; 1 + i as usize % 5] })
        .collect();
    let config = OrderConfig { shuffle: true, seed: 7, group_by_length: true, micro_batch_size: 4 };
    let mut straight = BatchStream::new(&examples, config, DataCursor::default());
    let mut firsts = Vec::new();
    for _ in 0..20 {
        firsts.push(straight.next_examples().iter().map(|e| e.ids[0]).collect::<Vec<_>>());
    }
    let mut a = BatchStream::new(&examples, config, DataCursor::default());
    for _ in 0..9 {
        a.next_examples();
    }
    let mut b = BatchStream::new(&examples, config, a.cursor);
    for first in &firsts[9..] {
        assert_eq!(&b.next_examples().iter().map(|e| e.ids[0]).collect::<Vec<_>>(), first);
    }
    assert_eq!(firsts[5].len(), 3, "the last micro-batch of an epoch holds the remainder");
}

#[test]
fn the_embedded_dataset_parses_and_has_its_licence() {
    let train = parse_jsonl(embedded::WORDNET_TRAIN, "wordnet/train", DatasetFormat::Auto, false).unwrap();
    let heldout = parse_jsonl(embedded::WORDNET_HELDOUT, "wordnet/heldout", DatasetFormat::Auto, false).unwrap();
    assert_eq!((train.examples.len(), heldout.examples.len()), (2800, 200));
    assert!(embedded::WORDNET_LICENSE.contains("WordNet 3.0 Copyright 2006 by Princeton University"));
}

#[test]
fn seq2seq_examples_split_source_and_target_each_ending_in_eos() {
    let t = tokenizer();
    let eos = t.token_id("</s>").unwrap();
    let text = "{\"input\": \"reverse: a b\", \"output\": \"b a\"}\n\
                {\"instruction\": \"Say hi\", \"output\": \"hi\"}\n\
                {\"messages\": [{\"role\": \"user\", \"content\": \"u1\"}, {\"role\": \"assistant\", \"content\": \"a1\"}, \
                {\"role\": \"user\", \"content\": \"u2\"}, {\"role\": \"assistant\", \"content\": \"a2\"}]}\n";
    let report = parse_jsonl(text, "s.jsonl", DatasetFormat::Auto, false).unwrap();
    assert_eq!(
        report.examples[0],
        Example::SourceTarget { source: "reverse: a b".into(), target: "b a".into() },
        "input/output lines are detected and taken as they are"
    );
    let limits = Limits::default();
    let s = tokenize_all_seq2seq(&report.examples, &t, &limits).unwrap();
    assert_eq!(s.truncated, 0);
    let text_of = |ids: &[u32]| t.decode(ids, false).unwrap();
    assert_eq!(text_of(&s.examples[0].source), "reverse: a b</s>");
    assert_eq!(text_of(&s.examples[0].target), "b a</s>");
    assert!(text_of(&s.examples[1].source).contains("### Instruction:\nSay hi"), "Alpaca's prompt is the source");
    // A chat: everything before the last assistant turn, through the template, is the source.
    assert_eq!(
        text_of(&s.examples[2].source),
        "<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\n</s>"
    );
    assert_eq!(text_of(&s.examples[2].target), "a2</s>");
    assert!(s.examples.iter().all(|e| e.source.last() == Some(&eos) && e.target.last() == Some(&eos)));

    // Cut to the limits, EOS kept.
    let short = Limits { source_max_len: 4, target_max_len: 2, train_on_source: false };
    let cut = tokenize_all_seq2seq(&report.examples[..1], &t, &short).unwrap();
    assert_eq!(
        (cut.truncated, text_of(&cut.examples[0].source), text_of(&cut.examples[0].target)),
        (1, "rev</s>".into(), "b</s>".into())
    );

    // Plain text has no target of its own.
    let text = parse_jsonl("{\"text\": \"abc\"}\n", "t.jsonl", DatasetFormat::Auto, false).unwrap();
    let err = tokenize_all_seq2seq(&text.examples, &t, &limits).unwrap_err().to_string();
    assert!(err.contains("example 1") && err.contains("no source/target split"), "{err}");
}

#[test]
fn seq2seq_batches_shift_the_target_right_behind_the_start_token() {
    let a = Seq2SeqExample { source: vec![10, 11, 1], target: vec![20, 21, 1] };
    let b = Seq2SeqExample { source: vec![12, 1], target: vec![1] };
    let batch = Seq2SeqBatch::new(&[&a, &b], 0, 0);
    assert_eq!((batch.batch, batch.source_len, batch.target_len), (2, 3, 3));
    assert_eq!(batch.source_ids, [10, 11, 1, 12, 1, 0]);
    assert_eq!(batch.source_padding, [false, false, false, false, false, true]);
    assert_eq!(batch.decoder_ids, [0, 20, 21, 0, 0, 0]);
    assert_eq!(batch.labels, [20, 21, 1, 1, 0, 0]);
    assert_eq!(batch.label_mask, [1., 1., 1., 1., 0., 0.]);
    assert_eq!(batch.targets, 4);
}
