//! `ledger-worker submit`: withdrawals read as JSON lines on stdin, one answer per line
//! (enqueued, replayed, refused or skipped) and a summary that counts each.

use super::*;

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

fn submit(conn: &mut PgConnection, out: &Output, input: impl BufRead) -> Result<Counts> {
    let mut currencies: HashMap<i64, Currency> = HashMap::new();
    let mut counts = Counts::default();
    for (n, line) in input.split(b'\n').enumerate() {
        let number = n as u64 + 1;
        let line = line.context("reading stdin")?;
        let (value, human) = if line.iter().all(u8::is_ascii_whitespace) {
            counts.skipped.push(number);
            (
                json!({ "line": number, "outcome": "skipped", "reason": "blank line" }),
                format!("line {number}: skipped (blank)"),
            )
        } else {
            answer(&mut counts, number, submit_line(conn, &mut currencies, &line))
        };
        out.print(value, || human)?;
    }
    Ok(counts)
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

fn submit_line(
    conn: &mut PgConnection,
    currencies: &mut HashMap<i64, Currency>,
    line: &[u8],
) -> Result<(WithdrawalId, bool)> {
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
    let currency = match currencies.get(&account.get()) {
        Some(c) => *c,
        None => {
            let c = accounts::get(conn, account)?.currency;
            currencies.insert(account.get(), c);
            c
        }
    };
    let amount = Money::parse_for(&amount, currency)?;
    Ok(withdrawals::request(conn, &WithdrawalRequest { account, amount, destination, key })?)
}
