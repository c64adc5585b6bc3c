//! `ledger-worker submit`: withdrawals read as JSON lines on stdin, one answer per line
//! (enqueued, replayed, refused or skipped) and a summary that counts each. Lines go in
//! chunks, each chunk one `withdrawals::request_batch`.

use super::*;
use ledger_core::batch::Item;
use ledger_core::withdrawals::RequestResult;

pub fn run(ctx: Ctx) -> Result<ExitCode> {
    let mut conn = connect(ctx.database_url.clone())?;
    let counts = submit(&mut conn, &ctx.out, std::io::stdin().lock())?;
    ctx.out.print(counts.to_json(), || counts.to_string())?;
    if counts.refused > 0 {
        return Err(CliError::Refused { kind: "refused", message: counts.to_string() }.into());
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitLine {
    account: i64,
    to: String,
    amount: Value,
    key: String,
}

/// Longest accepted input line; longer lines are refused, not buffered without bound.
const MAX_LINE_BYTES: usize = 16 * 1024;

/// What `submit` did with its input, line by line.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    enqueued: u64,
    /// The same key with the same request again: answered with the first withdrawal.
    replayed: u64,
    refused: u64,
    /// Blank lines, by number.
    skipped: Vec<u64>,
}

impl Counts {
    fn lines(&self) -> u64 {
        self.enqueued + self.replayed + self.refused + self.skipped.len() as u64
    }

    fn to_json(&self) -> Value {
        json!({ "summary": true, "lines": self.lines(), "enqueued": self.enqueued, "replayed": self.replayed,
                "refused": self.refused, "skipped": self.skipped.len(), "skipped_lines": self.skipped })
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} line(s): {} enqueued, {} replayed, {} refused, {} blank skipped",
            self.lines(),
            self.enqueued,
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

/// Lines taken per batch: one transaction and a few round trips per chunk, answers
/// flushed after each so a long input shows progress.
const CHUNK_LINES: usize = 1_000;

fn submit(conn: &mut PgConnection, out: &Output, input: impl BufRead) -> Result<Counts> {
    let mut counts = Counts::default();
    let mut chunk: Vec<(u64, Vec<u8>)> = Vec::with_capacity(CHUNK_LINES);
    for (n, line) in input.split(b'\n').enumerate() {
        chunk.push((n as u64 + 1, line.context("reading stdin")?));
        if chunk.len() == CHUNK_LINES {
            submit_chunk(conn, out, &mut counts, &chunk)?;
            chunk.clear();
        }
    }
    submit_chunk(conn, out, &mut counts, &chunk)?;
    Ok(counts)
}

/// One chunk of lines: parsed, their accounts' currencies read in one query, the valid
/// ones requested in one batch; every line answered in order, then flushed.
fn submit_chunk(conn: &mut PgConnection, out: &Output, counts: &mut Counts, chunk: &[(u64, Vec<u8>)]) -> Result<()> {
    let mut parsed: Vec<Option<Result<ParsedLine>>> =
        chunk.iter().map(|(_, line)| (!line.iter().all(u8::is_ascii_whitespace)).then(|| parse_line(line))).collect();
    let ids: Vec<i64> = parsed.iter().flatten().flatten().map(|p| p.account.get()).collect();
    let currencies = currencies_of(conn, &ids)?;
    let mut requests: Vec<Result<WithdrawalRequest>> = Vec::with_capacity(chunk.len());
    let mut slots: Vec<Option<usize>> = Vec::with_capacity(chunk.len());
    for p in parsed.iter_mut() {
        slots.push(p.take().map(|p| {
            requests.push(p.and_then(|p| p.request(&currencies)));
            requests.len() - 1
        }));
    }
    let mut results = request_all(conn, requests).into_iter();
    let mut text = String::new();
    for ((number, _), slot) in chunk.iter().zip(slots) {
        let (value, human) = match slot {
            None => {
                counts.skipped.push(*number);
                (
                    json!({ "line": number, "outcome": "skipped", "reason": "blank line" }),
                    format!("line {number}: skipped (blank)"),
                )
            }
            Some(_) => answer(counts, *number, results.next().expect("one result per non-blank line")),
        };
        text.push_str(&if out.json { value.to_string() } else { human });
        text.push('\n');
    }
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// The valid requests in one batch, the others refused as they are; if the batch as a
/// whole fails, each request on its own, so each line gets its own answer as before.
fn request_all(conn: &mut PgConnection, requests: Vec<Result<WithdrawalRequest>>) -> Vec<Result<(WithdrawalId, bool)>> {
    let items: Vec<Item<WithdrawalRequest>> =
        requests.iter().filter_map(|r| r.as_ref().ok()).cloned().map(Item::single).collect();
    let batch = withdrawals::request_batch(conn, &items);
    let mut batched = batch.ok().map(Vec::into_iter);
    requests
        .into_iter()
        .map(|r| {
            let req = r?;
            match batched.as_mut() {
                Some(results) => match results.next().expect("one result per item") {
                    RequestResult::Created { id } => Ok((id, false)),
                    RequestResult::Replayed { id } => Ok((id, true)),
                    RequestResult::Refused(e) => Err(e.into()),
                },
                None => Ok(withdrawals::request(conn, &req)?),
            }
        })
        .collect()
}

/// The currency of every account named, in one query; an account not found is left
/// out (its lines are refused as unknown).
fn currencies_of(conn: &mut PgConnection, ids: &[i64]) -> Result<HashMap<i64, Currency>> {
    use diesel::prelude::*;
    use ledger_core::schema::accounts;
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(i64, String)> = accounts::table
        .filter(accounts::id.eq_any(ids))
        .select((accounts::id, accounts::currency))
        .load(conn)
        .context("reading the accounts' currencies")?;
    rows.into_iter().map(|(id, code)| Ok((id, Currency::from_code(&code)?))).collect()
}

/// One line's answer, counted.
fn answer(counts: &mut Counts, number: u64, result: Result<(WithdrawalId, bool)>) -> (Value, String) {
    match result {
        Ok((id, replayed)) => {
            let outcome = if replayed { "replayed" } else { "enqueued" };
            *(if replayed { &mut counts.replayed } else { &mut counts.enqueued }) += 1;
            let value = json!({ "line": number, "outcome": outcome, "id": id.get(), "replayed": replayed });
            (value, format!("line {number}: withdrawal {id} {outcome}"))
        }
        Err(e) => {
            counts.refused += 1;
            let failure = Failure::of(&e);
            let mut value = failure.to_json();
            value["line"] = json!(number);
            value["outcome"] = json!("refused");
            value["error"] = json!(failure.message);
            (value, format!("line {number}: refused: {}", failure.message))
        }
    }
}

fn bad_line(field: &'static str, reason: String) -> anyhow::Error {
    LedgerError::Invalid(ledger_core::InvalidInput::BadField { field, reason }).into()
}

/// A line as read, before its amount is parsed in its account's currency.
struct ParsedLine {
    account: AccountId,
    amount: String,
    destination: Iban,
    key: IdempotencyKey,
}

impl ParsedLine {
    fn request(self, currencies: &HashMap<i64, Currency>) -> Result<WithdrawalRequest> {
        let currency = *currencies.get(&self.account.get()).ok_or(LedgerError::UnknownAccount(self.account))?;
        let amount = Money::parse_for(&self.amount, currency)?;
        Ok(WithdrawalRequest { account: self.account, amount, destination: self.destination, key: self.key })
    }
}

fn parse_line(line: &[u8]) -> Result<ParsedLine> {
    if line.len() > MAX_LINE_BYTES {
        return Err(bad_line("line", format!("longer than {MAX_LINE_BYTES} bytes")));
    }
    let req: SubmitLine = serde_json::from_slice(line).map_err(|e| bad_line("line", format!("bad JSON: {e}")))?;
    let Value::String(amount) = req.amount else {
        return Err(bad_line("amount", "must be a decimal string like \"50.00\", not a JSON number".into()));
    };
    let account = account_id(req.account)?;
    let key = IdempotencyKey::new(req.key)?;
    let destination = Iban::parse(&req.to)?;
    Ok(ParsedLine { account, amount, destination, key })
}
