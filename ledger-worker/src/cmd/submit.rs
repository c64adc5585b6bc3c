//! `ledger-worker submit`: withdrawals read as JSON lines on stdin, one answer per line
//! (enqueued, replayed, refused or skipped) and a summary that counts each. Lines go in
//! chunks ([`super::lines`]), each chunk one `withdrawals::request_batch`.

use super::lines::{self, refusal, Counts, Line};
use super::reconnect::Reconnecting;
use super::*;
use ledger_core::batch::Item;
use ledger_core::error::RetryClass;
use ledger_core::withdrawals::RequestResult;

pub fn run(ctx: Ctx) -> Result<ExitCode> {
    let mut conn = Reconnecting::connect(&ctx)?;
    lines::run(
        &ctx,
        "enqueued",
        std::io::stdin().lock(),
        |l| (parse_line(l), false),
        |counts, chunk, _| submit_chunk(&mut conn, counts, chunk),
    )
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitLine {
    account: i64,
    to: String,
    amount: Value,
    key: String,
}

/// One chunk of lines: their accounts' currencies read in one query, the valid ones
/// requested in one batch; every line answered in order. A lost connection sends the
/// chunk again on a new one ([`Reconnecting`]).
fn submit_chunk(
    conn: &mut Reconnecting,
    counts: &mut Counts,
    chunk: Vec<Line<Result<ParsedLine>>>,
) -> Result<Vec<(Value, String)>> {
    let ids: Vec<i64> = chunk.iter().filter_map(|l| l.parsed.as_ref().ok()).map(|p| p.account.get()).collect();
    let (first, last) = (chunk.first().map_or(0, |l| l.number), chunk.last().map_or(0, |l| l.number));
    let results = conn.run(first, last, |conn| {
        let currencies = currencies_of(conn, &ids)?;
        // A line that did not parse gets its own error back below.
        let requests = chunk
            .iter()
            .map(|l| l.parsed.as_ref().map_err(|_| anyhow!("not parsed")).and_then(|p| p.request(&currencies)))
            .collect();
        request_all(conn, requests)
    })?;
    let answers = chunk.into_iter().zip(results).map(|(l, result)| {
        let result = match l.parsed {
            Err(e) => Err(e),
            Ok(_) => result,
        };
        answer(counts, l.number, result)
    });
    Ok(answers.collect())
}

/// The valid requests in one batch, the others refused as they are; if the batch as a
/// whole fails, each request on its own, so each line gets its own answer as before. A
/// transient failure (a lost connection: the commit may have happened) answers no line:
/// it ends the chunk as an error, so no line is called refused that may be written.
fn request_all(
    conn: &mut PgConnection,
    requests: Vec<Result<WithdrawalRequest>>,
) -> Result<Vec<Result<(WithdrawalId, bool)>>> {
    let items: Vec<Item<WithdrawalRequest>> =
        requests.iter().filter_map(|r| r.as_ref().ok()).cloned().map(Item::single).collect();
    if items.is_empty() {
        // Nothing to write (an empty last chunk, or every line refused already): no
        // round trip, so nothing that could be lost.
        return Ok(requests.into_iter().map(|r| r.map(|_| unreachable!("no valid request"))).collect());
    }
    let mut batched = match withdrawals::request_batch(conn, &items) {
        Ok(results) => Some(results.into_iter()),
        Err(e) if e.transient().is_some() => return Err(e.into()),
        Err(_) => None,
    };
    let mut answers = Vec::with_capacity(requests.len());
    for r in requests {
        let req = match r {
            Ok(req) => req,
            Err(e) => {
                answers.push(Err(e));
                continue;
            }
        };
        answers.push(match batched.as_mut() {
            Some(results) => match results.next().expect("one result per item") {
                RequestResult::Created { id } => Ok((id, false)),
                RequestResult::Replayed { id } => Ok((id, true)),
                RequestResult::Refused(e) => Err(e.into()),
            },
            None => match withdrawals::request(conn, &req) {
                Err(e) if e.transient().is_some() => return Err(e.into()),
                other => other.map_err(Into::into),
            },
        });
    }
    Ok(answers)
}

/// The currency of every account named, in one query; an account not found is left
/// out (its lines are refused as unknown).
pub(super) fn currencies_of(conn: &mut PgConnection, ids: &[i64]) -> Result<HashMap<i64, Currency>> {
    use diesel::prelude::*;
    use ledger_core::schema::accounts;
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let rows: Vec<(i64, String)> = accounts::table
        .filter(accounts::id.eq_any(&ids))
        .select((accounts::id, accounts::currency))
        .load(conn)
        .map_err(LedgerError::from)
        .context("reading the accounts' currencies")?;
    rows.into_iter().map(|(id, code)| Ok((id, Currency::from_code(&code)?))).collect()
}

/// One line's answer, counted.
fn answer(counts: &mut Counts, number: u64, result: Result<(WithdrawalId, bool)>) -> (Value, String) {
    match result {
        Ok((id, replayed)) => {
            let outcome = if replayed { "replayed" } else { "enqueued" };
            *(if replayed { &mut counts.replayed } else { &mut counts.done }) += 1;
            let value = json!({ "line": number, "outcome": outcome, "id": id.get(), "replayed": replayed });
            (value, format!("line {number}: withdrawal {id} {outcome}"))
        }
        Err(e) => refusal(counts, number, &e),
    }
}

/// A line as read, before its amount is parsed in its account's currency.
struct ParsedLine {
    account: AccountId,
    amount: String,
    destination: Iban,
    key: IdempotencyKey,
}

impl ParsedLine {
    fn request(&self, currencies: &HashMap<i64, Currency>) -> Result<WithdrawalRequest> {
        let currency = *currencies.get(&self.account.get()).ok_or(LedgerError::UnknownAccount(self.account))?;
        let amount = Money::parse_for(&self.amount, currency)?;
        let (destination, key) = (self.destination.clone(), self.key.clone());
        Ok(WithdrawalRequest { account: self.account, amount, destination, key })
    }
}

fn parse_line(line: &[u8]) -> Result<ParsedLine> {
    let req: SubmitLine = lines::parse_json(line)?;
    let amount = lines::amount_text(req.amount)?;
    let account = account_id(req.account)?;
    let key = IdempotencyKey::new(req.key)?;
    let destination = Iban::parse(&req.to)?;
    Ok(ParsedLine { account, amount, destination, key })
}
