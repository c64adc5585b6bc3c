//! `ledger-worker transfer submit`: transfers read as JSON lines on stdin, one answer per
//! line (created with both balances, replayed, refused or skipped) and a summary. Lines go
//! in chunks ([`super::lines`]) that never split a linked chain, each chunk one
//! `transfers::create_batch` (more if it holds more than a batch may take).

use std::ops::Range;

use super::lines::{self, bad_line, refusal, Counts, Line};
use super::reconnect::Reconnecting;
use super::submit::currencies_of;
use super::*;
use ledger_core::batch::{Item, MAX_BATCH_ITEMS};
use ledger_core::error::RetryClass;
use ledger_core::metadata::Metadata;
use ledger_core::transfers::TransferResult;

pub fn run(ctx: Ctx) -> Result<ExitCode> {
    let mut conn = Reconnecting::connect(&ctx)?;
    lines::run(&ctx, "created", std::io::stdin().lock(), parse_line, |counts, chunk, _| {
        transfer_chunk(&mut conn, counts, chunk)
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferLine {
    from: i64,
    to: i64,
    amount: Value,
    key: String,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    linked: bool,
}

/// A line as read, before its amount is parsed in its accounts' currency.
struct ParsedLine {
    from: AccountId,
    to: AccountId,
    amount: String,
    key: IdempotencyKey,
    metadata: Option<Metadata>,
}

/// A line and whether it is linked to the next. A line that is not a valid transfer
/// still counts as linked when it says so, so its whole chain is refused with it. One
/// whose `linked` cannot be read (not JSON, cut off, not an object, `linked` not a
/// boolean) counts as linked: it may have opened or continued a chain, so the lines up
/// to the next readable unlinked one are refused with it, never partly applied. Only a
/// readable object without `linked` is unlinked, as its default says.
fn parse_line(line: &[u8]) -> (Result<ParsedLine>, bool) {
    match lines::parse_json::<TransferLine>(line) {
        Ok(t) => {
            let linked = t.linked;
            (parsed(t), linked)
        }
        Err(e) => {
            let linked = match serde_json::from_slice::<Value>(line) {
                Ok(Value::Object(fields)) => fields.get("linked").map_or(Some(false), Value::as_bool),
                _ => None,
            };
            (Err(e), linked.unwrap_or(true))
        }
    }
}

fn parsed(t: TransferLine) -> Result<ParsedLine> {
    let amount = lines::amount_text(t.amount)?;
    let (from, to, key) = (account_id(t.from)?, account_id(t.to)?, IdempotencyKey::new(t.key)?);
    let metadata = t.metadata.as_ref().map(Metadata::new).transpose().map_err(LedgerError::Invalid)?;
    Ok(ParsedLine { from, to, amount, key, metadata })
}

impl ParsedLine {
    fn transfer(&self, currencies: &HashMap<i64, Currency>) -> Result<Transfer> {
        let currency = *currencies.get(&self.from.get()).ok_or(LedgerError::UnknownAccount(self.from))?;
        let amount = Money::parse_for(&self.amount, currency)?;
        let (key, metadata) = (self.key.clone(), self.metadata.clone());
        Ok(Transfer { from: self.from, to: self.to, amount, key, metadata })
    }
}

/// What became of one line of a chunk: its batch result and the transfer it was for.
type Outcome = Result<(TransferResult, Transfer)>;

/// One chunk: currencies in one query, each chain checked (a bad line, an open or an
/// overlong chain refuses all of it), the good chains created in batches. A lost
/// connection sends the chunk again on a new one ([`Reconnecting`]).
fn transfer_chunk(
    conn: &mut Reconnecting,
    counts: &mut Counts,
    chunk: Vec<Line<Result<ParsedLine>>>,
) -> Result<Vec<(Value, String)>> {
    let ids: Vec<i64> =
        chunk.iter().filter_map(|l| l.parsed.as_ref().ok()).flat_map(|p| [p.from.get(), p.to.get()]).collect();
    let numbers: Vec<u64> = chunk.iter().map(|l| l.number).collect();
    let linked: Vec<bool> = chunk.iter().map(|l| l.linked).collect();
    let (first, last) = (numbers.first().copied().unwrap_or(0), numbers.last().copied().unwrap_or(0));
    let outcomes = conn.run(first, last, |conn| {
        let currencies = currencies_of(conn, &ids)?;
        let mut items: Vec<Option<Item<Transfer>>> = Vec::with_capacity(chunk.len());
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(chunk.len());
        for line in &chunk {
            // A line that did not parse gets its own error back below.
            match line.parsed.as_ref().map_err(|_| anyhow!("not parsed")).and_then(|p| p.transfer(&currencies)) {
                Ok(t) => (items.push(Some(Item { request: t, linked: line.linked })), outcomes.push(None)),
                Err(e) => (items.push(None), outcomes.push(Some(Err(e)))),
            };
        }
        let good = refuse_bad_chains(&numbers, &linked, &items, &mut outcomes);
        create_chains(conn, &numbers, &mut items, &good, &mut outcomes)?;
        Ok(outcomes)
    })?;
    let answers = chunk.into_iter().zip(outcomes).map(|(line, outcome)| {
        let outcome = match line.parsed {
            Err(e) => Err(e),
            Ok(_) => outcome.expect("every line decided"),
        };
        answer(counts, line.number, outcome)
    });
    Ok(answers.collect())
}

/// The chunk's chains (a run of linked lines closed by an unlinked one); a chain with a
/// bad line, longer than a batch or still open at the chunk's end is refused as a whole.
/// Returns the good chains.
fn refuse_bad_chains(
    numbers: &[u64],
    linked: &[bool],
    items: &[Option<Item<Transfer>>],
    outcomes: &mut [Option<Outcome>],
) -> Vec<Range<usize>> {
    let mut good = Vec::new();
    let mut start = 0;
    for i in 0..linked.len() {
        if linked[i] && i + 1 < linked.len() {
            continue;
        }
        let chain = start..i + 1;
        start = i + 1;
        let reason = if linked[i] {
            Some(format!("its linked chain (from line {}) is still open at the end of the input", numbers[chain.start]))
        } else if chain.len() > MAX_BATCH_ITEMS {
            Some(format!("its linked chain has {} lines; at most {MAX_BATCH_ITEMS}", chain.len()))
        } else {
            let bad = chain.clone().find(|&j| items[j].is_none());
            bad.map(|j| format!("line {} of its linked chain was refused", numbers[j]))
        };
        match reason {
            None => good.push(chain),
            Some(reason) => {
                for j in chain.filter(|&j| items[j].is_some()) {
                    outcomes[j] = Some(Err(bad_line("linked", reason.clone())));
                }
            }
        }
    }
    good
}

/// The good chains in as few `create_batch` calls as a batch's limit allows; if a call
/// fails as a whole, each of its chains on its own (a chain is never split). A
/// transient failure (a lost connection: the commit may have happened) is no answer for
/// any line: it ends the chunk as an error, so no line is called refused that may
/// have been written.
fn create_chains(
    conn: &mut PgConnection,
    numbers: &[u64],
    items: &mut [Option<Item<Transfer>>],
    good: &[Range<usize>],
    outcomes: &mut [Option<Outcome>],
) -> Result<()> {
    let mut groups: Vec<Vec<Range<usize>>> = Vec::new();
    let mut size = 0;
    for chain in good {
        if groups.is_empty() || size + chain.len() > MAX_BATCH_ITEMS {
            groups.push(Vec::new());
            size = 0;
        }
        size += chain.len();
        groups.last_mut().expect("just pushed").push(chain.clone());
    }
    for group in groups {
        let index: Vec<usize> = group.iter().flat_map(Range::clone).collect();
        let batch: Vec<Item<Transfer>> = index.iter().map(|&j| items[j].clone().expect("a good line")).collect();
        match transfers::create_batch(conn, &batch) {
            Ok(results) => record(numbers, &index, &batch, results, outcomes),
            Err(e) if e.transient().is_some() => return Err(e.into()),
            Err(_) if group.len() > 1 => {
                for chain in group {
                    create_chains(conn, numbers, items, &[chain], outcomes)?;
                }
            }
            Err(e) => {
                let reason = format!("its linked chain could not be written: {e}");
                for &j in &index {
                    outcomes[j] = Some(Err(bad_line("batch", reason.clone())));
                }
            }
        }
    }
    Ok(())
}

/// One batch's results put in their lines' places; a chain refused for another item's
/// sake names that item's line.
fn record(
    numbers: &[u64],
    index: &[usize],
    batch: &[Item<Transfer>],
    results: Vec<TransferResult>,
    outcomes: &mut [Option<Outcome>],
) {
    assert_eq!(results.len(), index.len(), "one result per item");
    for ((&j, item), result) in index.iter().zip(batch).zip(results) {
        outcomes[j] = Some(match result {
            TransferResult::Refused(LedgerError::LinkedItemFailed { failed }) => {
                Err(bad_line("linked", format!("line {} of its linked chain was refused", numbers[index[failed]])))
            }
            TransferResult::Refused(e) => Err(e.into()),
            other => Ok((other, item.request.clone())),
        });
    }
}

/// One line's answer, counted.
fn answer(counts: &mut Counts, number: u64, outcome: Outcome) -> (Value, String) {
    match outcome {
        Ok((TransferResult::Created { entry, from_balance_minor, to_balance_minor }, t)) => {
            counts.done += 1;
            let currency = t.amount.currency();
            let (from, to) = (currency.format_minor(from_balance_minor), currency.format_minor(to_balance_minor));
            let human = format!(
                "line {number}: transferred {} (entry {entry}); balances after it: {} {from}, {} {to} {currency}",
                t.amount, t.from, t.to
            );
            let value = json!({ "line": number, "outcome": "created", "entry": entry.get(),
                                "from_balance": from, "to_balance": to });
            (value, human)
        }
        Ok((TransferResult::Replayed { entry }, _)) => {
            counts.replayed += 1;
            let value = json!({ "line": number, "outcome": "replayed", "entry": entry.get() });
            (value, format!("line {number}: transfer replayed (entry {entry})"))
        }
        Ok((TransferResult::Refused(e), _)) => refusal(counts, number, &e.into()),
        Err(e) => refusal(counts, number, &e),
    }
}
