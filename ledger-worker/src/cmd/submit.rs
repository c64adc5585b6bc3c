//! `ledger-worker submit`: withdrawals read as JSON lines on stdin, one result line each.

use super::*;

pub fn run(ctx: Ctx) -> Result<ExitCode> {
    submit(ctx.database_url)
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

fn submit(url: Option<String>) -> Result<ExitCode> {
    let mut conn = connect(url)?;
    let stdin = std::io::stdin().lock();
    let mut currencies: HashMap<i64, Currency> = HashMap::new();
    let (mut ok, mut bad) = (0_usize, 0_usize);
    let mut stdout = std::io::stdout().lock();
    for (n, line) in stdin.split(b'\n').enumerate() {
        let number = n + 1;
        let line = line.context("reading stdin")?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let result = if line.len() > MAX_LINE_BYTES {
            Err(anyhow!("line longer than {MAX_LINE_BYTES} bytes"))
        } else {
            submit_line(&mut conn, &mut currencies, &line)
        };
        let value = match result {
            Ok((id, replayed)) => {
                ok += 1;
                json!({ "line": number, "id": id.get(), "status": "pending", "replayed": replayed })
            }
            Err(e) => {
                bad += 1;
                json!({ "line": number, "error": format!("{e:#}") })
            }
        };
        writeln!(stdout, "{value}")?;
    }
    stdout.flush()?;
    if bad > 0 {
        eprintln!("error: {bad} of {} line(s) refused; the other {ok} were enqueued", ok + bad);
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn submit_line(
    conn: &mut PgConnection,
    currencies: &mut HashMap<i64, Currency>,
    line: &[u8],
) -> Result<(WithdrawalId, bool)> {
    let req: SubmitLine = serde_json::from_slice(line).map_err(|e| anyhow!("bad JSON: {e}"))?;
    let Value::String(amount) = req.amount else {
        bail!("amount must be a decimal string like \"50.00\", not a JSON number");
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
    let amount = Amount::parse(&amount, currency)?;
    Ok(withdrawals::request(conn, &WithdrawalRequest { account, amount, currency, destination, key })?)
}
