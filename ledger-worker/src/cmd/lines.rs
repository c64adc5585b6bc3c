//! JSON lines on stdin, shared by `submit` and `transfer submit`: lines read in chunks
//! (a chunk never ends inside a linked chain), blank lines skipped, every line answered
//! in order and flushed after each chunk, and the summary's counts.

use super::*;
use ledger_core::batch::MAX_BATCH_ITEMS;

/// Lines taken per chunk: one batch and a few round trips each, answers flushed after
/// each so a long input shows progress. A chunk is extended until a linked chain closes.
pub(super) const CHUNK_LINES: usize = 1_000;

/// Longest accepted input line; longer lines are refused, not parsed.
pub(super) const MAX_LINE_BYTES: usize = 16 * 1024;

/// What a line-reading command did with its input, line by line.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Counts {
    /// Lines applied for the first time ("enqueued" or "created", see `done_name`).
    pub done: u64,
    /// The same key with the same request again: answered with the first result.
    pub replayed: u64,
    /// Lines refused, with why.
    pub refused: u64,
    /// Blank lines, by number.
    pub skipped: Vec<u64>,
    /// The summary's name for `done`.
    pub done_name: &'static str,
}

impl Counts {
    fn lines(&self) -> u64 {
        self.done + self.replayed + self.refused + self.skipped.len() as u64
    }

    fn to_json(&self) -> Value {
        let mut value = json!({ "summary": true, "lines": self.lines(), "replayed": self.replayed,
                "refused": self.refused, "skipped": self.skipped.len(), "skipped_lines": self.skipped });
        value[self.done_name] = json!(self.done);
        value
    }
}

impl Counts {
    /// The summary of an input that stopped with lines `first` to `end` unanswered.
    fn stopped_json(&self, first: u64, end: u64) -> Value {
        let mut value = self.to_json();
        value["stopped"] = json!(true);
        value["unknown_lines"] = json!({ "from": first, "to": end });
        value
    }

    fn stopped_text(&self, first: u64, end: u64) -> String {
        format!("stopped: {self}; lines {first} to {end}: outcome unknown, the rest not read")
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} line(s): {} {}, {} replayed, {} refused, {} blank skipped",
            self.lines(),
            self.done,
            self.done_name,
            self.replayed,
            self.refused,
            self.skipped.len()
        )?;
        if !self.skipped.is_empty() {
            let numbers: Vec<String> = self.skipped.iter().map(u64::to_string).collect();
            write!(f, " (line {})", numbers.join(", "))?;
        }
        Ok(())
    }
}

/// One non-blank line, parsed by the command, and whether it is linked to the next.
pub(super) struct Line<P> {
    /// Its number in the input, from 1.
    pub number: u64,
    /// What the command made of it.
    pub parsed: P,
    /// Linked to the next non-blank line: the chunk goes on past it.
    pub linked: bool,
}

/// Reads `input` in chunks; `parse` makes each non-blank line a `(P, linked)`, `answer`
/// turns a chunk's lines into one (JSON, human) answer each, in order. Prints every
/// answer (blank lines answered "skipped" in place), flushes after each chunk, then
/// prints the summary; exit status 1 (`CliError::Refused`) if any line was refused.
pub(super) fn run<P>(
    ctx: &Ctx,
    done_name: &'static str,
    input: impl BufRead,
    mut parse: impl FnMut(&[u8]) -> (P, bool),
    mut answer: impl FnMut(&mut Counts, Vec<Line<P>>, bool) -> Result<Vec<(Value, String)>>,
) -> Result<ExitCode> {
    let mut counts = Counts { done_name, ..Counts::default() };
    let mut chunk: Vec<Line<P>> = Vec::with_capacity(CHUNK_LINES);
    let mut blanks: Vec<u64> = Vec::new();
    let mut answered: Vec<Answer> = Vec::new();
    // The first line of a chain refused as too long while the chain is still open:
    // every line up to its closing one is refused with it.
    let mut overlong: Option<u64> = None;
    let mut read = 0;
    for (n, line) in input.split(b'\n').enumerate() {
        let (number, line) = (n as u64 + 1, line.context("reading stdin")?);
        read += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            blanks.push(number);
        } else {
            let (parsed, linked) = parse(&line);
            match overlong {
                Some(first) => {
                    answered.push((number, overlong_refusal(&mut counts, number, first)));
                    overlong = overlong.filter(|_| linked);
                }
                None => chunk.push(Line { number, parsed, linked }),
            }
        }
        if chunk.len() > CHUNK_LINES + MAX_BATCH_ITEMS && chunk.last().is_some_and(|l| l.linked) {
            // A chunk ends after an unlinked line once it holds CHUNK_LINES, so its open
            // tail is a chain longer than a batch may take: refused here, and the rest
            // of it as it is read, so memory stays bounded. (A chain that closes right
            // here is whole in the chunk, and `answer` refuses it for its length.)
            let open = chunk.iter().rposition(|l| !l.linked).map_or(0, |i| i + 1);
            let first = chunk[open].number;
            for l in chunk.split_off(open) {
                answered.push((l.number, overlong_refusal(&mut counts, l.number, first)));
            }
            overlong = Some(first);
        }
        if read >= CHUNK_LINES && chunk.last().is_none_or(|l| !l.linked) {
            let (lines, pre) = (std::mem::take(&mut chunk), std::mem::take(&mut answered));
            flush(&ctx.out, &mut counts, lines, &mut blanks, pre, false, &mut answer)?;
            read = 0;
        }
    }
    flush(&ctx.out, &mut counts, chunk, &mut blanks, answered, true, &mut answer)?;
    ctx.out.print(counts.to_json(), || counts.to_string())?;
    if counts.refused > 0 {
        return Err(CliError::Refused { kind: "refused", message: counts.to_string() }.into());
    }
    Ok(ExitCode::SUCCESS)
}

/// A line's number and its (JSON, human) answer.
type Answer = (u64, (Value, String));

/// The answer to a line of a linked chain that grew longer than a batch may take.
fn overlong_refusal(counts: &mut Counts, number: u64, first: u64) -> (Value, String) {
    let reason = format!("its linked chain (from line {first}) has more than {MAX_BATCH_ITEMS} lines");
    refusal(counts, number, &bad_line("linked", reason))
}

/// Answers a chunk's lines, its blank lines and the lines answered before (`pre`), all
/// in input order, and flushes them. If `answer` fails (a lost connection: nothing can
/// be said of the chunk's lines), none is printed and the error names them.
fn flush<P>(
    out: &Output,
    counts: &mut Counts,
    chunk: Vec<Line<P>>,
    blanks: &mut Vec<u64>,
    pre: Vec<Answer>,
    last: bool,
    answer: &mut impl FnMut(&mut Counts, Vec<Line<P>>, bool) -> Result<Vec<(Value, String)>>,
) -> Result<()> {
    let numbers: Vec<u64> = chunk.iter().map(|l| l.number).collect();
    let unanswered = numbers.iter().chain(pre.iter().map(|(n, _)| n)).chain(blanks.iter());
    let (first, end) = (unanswered.clone().min().copied(), unanswered.max().copied());
    let answers = answer(counts, chunk, last).with_context(|| {
        let (first, end) = (first.unwrap_or(0), end.unwrap_or(0));
        // The last stdout line is a summary here too: what was answered, and which
        // lines are not. (If stdout itself fails, the error below still says it.)
        let _ = out.print(counts.stopped_json(first, end), || counts.stopped_text(first, end));
        format!(
            "lines {first} to {end} are not answered and their outcome is unknown (each may or may not be \
             written); the lines before them are answered above, the lines after them were not read. Sending \
             the same lines again is safe: each key is applied at most once"
        )
    })?;
    let mut all: Vec<Answer> = numbers.into_iter().zip(answers).chain(pre).collect();
    for b in blanks.drain(..) {
        counts.skipped.push(b);
        let value = json!({ "line": b, "outcome": "skipped", "reason": "blank line" });
        all.push((b, (value, format!("line {b}: skipped (blank)"))));
    }
    all.sort_by_key(|(number, _)| *number);
    let mut text = String::new();
    for (_, (value, human)) in all {
        text.push_str(&if out.json { value.to_string() } else { human });
        text.push('\n');
    }
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// A refused line's answer, counted: its failure's JSON with the line number.
pub(super) fn refusal(counts: &mut Counts, number: u64, e: &anyhow::Error) -> (Value, String) {
    counts.refused += 1;
    let failure = Failure::of(e);
    let mut value = failure.to_json();
    value["line"] = json!(number);
    value["outcome"] = json!("refused");
    value["error"] = json!(failure.message);
    (value, format!("line {number}: refused: {}", failure.message))
}

/// An input error on one field of a line.
pub(super) fn bad_line(field: &'static str, reason: String) -> anyhow::Error {
    LedgerError::Invalid(ledger_core::InvalidInput::BadField { field, reason }).into()
}

/// A line as JSON of type `T` (unknown fields refused by `T`), or why not.
pub(super) fn parse_json<T: serde::de::DeserializeOwned>(line: &[u8]) -> Result<T> {
    if line.len() > MAX_LINE_BYTES {
        return Err(bad_line("line", format!("longer than {MAX_LINE_BYTES} bytes")));
    }
    serde_json::from_slice(line).map_err(|e| bad_line("line", format!("bad JSON: {e}")))
}

/// A JSON amount that must be a decimal string.
pub(super) fn amount_text(amount: Value) -> Result<String> {
    match amount {
        Value::String(text) => Ok(text),
        _ => Err(bad_line("amount", "must be a decimal string like \"50.00\", not a JSON number".into())),
    }
}
