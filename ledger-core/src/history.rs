//! An account's history: its postings in order, each with the balance right after it,
//! paged by a cursor; and its balance at a point in the past.
//!
//! A page is one statement over the `(account_id, id)` index of `postings`: the page's
//! postings (`id > cursor`, ascending, `LIMIT`) and the balance before them. That
//! balance is the stored `balance_after_minor` of the account's last posting up to the
//! cursor (one index probe; customer accounts, whose stored balances the audit checks
//! against the running sum), or, for a system account (no stored balance), the sum of
//! its postings up to the cursor. The running balance of the page is that seed plus each
//! amount, with checked arithmetic, so the pages of one history chain exactly.
//!
//! Both run under [`tx::with_batch_plans`], so the plan stays those index probes
//! whatever the statistics say (`tests/history.rs` checks the page's plan).
//!
//! The same statement reads the account row, so an unknown account is
//! [`LedgerError::UnknownAccount`], even when the page is empty.
//!
//! Order is the postings' ids. A customer account's postings are written under its row
//! lock, so their ids follow the order its balance changed. A system account is written
//! without a lock: a posting with a lower id may commit after a page past it was read,
//! and a reader paging while money moves could miss it (a later full read has it).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use diesel::pg::PgConnection;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::{QueryableByName, RunQueryDsl};

use crate::error::LedgerError;
use crate::ids::{AccountId, EntryId};
use crate::input::InvalidInput;
use crate::journal::EntryKind;
use crate::metadata::Metadata;
use crate::money::Currency;
use crate::tx::{self, TxOptions};

/// A posting's id: the history's cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PostingId(i64);

impl PostingId {
    /// Ids are positive; anything else cannot name a posting.
    pub fn new(id: i64) -> Result<PostingId, InvalidInput> {
        if id <= 0 {
            return Err(InvalidInput::BadId { kind: "PostingId", value: id });
        }
        Ok(PostingId(id))
    }

    /// The database id, always positive.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl std::fmt::Display for PostingId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One line of an account's history: one posting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryLine {
    /// The cursor of the next page, when this is the last line read.
    pub posting_id: PostingId,
    /// The journal entry the posting belongs to.
    pub entry_id: EntryId,
    /// When the entry was written (its transaction's start), to the microsecond.
    pub created_at: SystemTime,
    /// What the entry records.
    pub kind: EntryKind,
    /// The entry's reference as stored (what it was for), if any.
    pub reference: Option<String>,
    /// The caller's metadata on the entry (a transfer's), if any.
    pub metadata: Option<Metadata>,
    /// The posting's currency, the account's.
    pub currency: Currency,
    /// Signed, in minor units: positive raised the balance.
    pub amount_minor: i64,
    /// The balance right after this posting, in minor units.
    pub balance_after_minor: i64,
}

/// A point in an account's past.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// Right after this journal entry: every posting of an entry with this id or a
    /// lower one.
    Entry(EntryId),
    /// At this moment: every posting whose entry was written at or before it (an entry
    /// is dated by its transaction's start).
    Time(SystemTime),
}

/// An account's balance at a point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalanceAt {
    /// The account asked about.
    pub account: AccountId,
    /// The account's currency.
    pub currency: Currency,
    /// The balance at that point, in minor units (0 before its first posting).
    pub balance_minor: i64,
}

/// The statement [`page`] runs: `$1` the account, `$2` the cursor (0: from the
/// start), `$3` the limit. One row with NULL posting columns when the page is empty;
/// no row when the account does not exist.
pub const PAGE_SQL: &str = "
    SELECT s.minor AS seed_minor,
           p.id AS posting_id, p.entry_id, p.currency, p.amount_minor,
           e.kind, e.reference, e.metadata,
           (EXTRACT(EPOCH FROM e.created_at) * 1000000)::int8 AS created_us
    FROM accounts a
    CROSS JOIN (SELECT COALESCE(
            (SELECT q.balance_after_minor FROM postings q
             WHERE q.account_id = $1 AND q.id <= $2 ORDER BY q.id DESC LIMIT 1),
            (SELECT sum(q.amount_minor) FROM postings q WHERE q.account_id = $1 AND q.id <= $2)::int8,
            0) AS minor) s
    LEFT JOIN LATERAL (
        SELECT id, entry_id, currency, amount_minor FROM postings
        WHERE account_id = $1 AND id > $2 ORDER BY id LIMIT $3) p ON true
    LEFT JOIN journal_entries e ON e.id = p.entry_id
    WHERE a.id = $1
    ORDER BY p.id";

#[derive(QueryableByName)]
struct PageRow {
    #[diesel(sql_type = BigInt)]
    seed_minor: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    posting_id: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    entry_id: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    currency: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    amount_minor: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    kind: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    reference: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    metadata: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    created_us: Option<i64>,
}

/// Up to `limit` (at least 1) postings of `account` after the cursor (`None`: from the
/// first), oldest first, each with the balance right after it. Fewer than `limit`
/// lines: the history ends there (for now). The next page starts after the last
/// line's `posting_id`.
pub fn page(
    conn: &mut PgConnection,
    account: AccountId,
    after: Option<PostingId>,
    limit: i64,
) -> Result<Vec<HistoryLine>, LedgerError> {
    let limit = crate::input::positive_limit(limit)?;
    let rows: Vec<PageRow> = by_index(conn, |conn| {
        Ok(diesel::sql_query(PAGE_SQL)
            .bind::<BigInt, _>(account.get())
            .bind::<BigInt, _>(after.map_or(0, PostingId::get))
            .bind::<BigInt, _>(limit)
            .load(conn)?)
    })?;
    let Some(first) = rows.first() else { return Err(LedgerError::UnknownAccount(account)) };
    let mut balance = first.seed_minor;
    let mut lines = Vec::with_capacity(rows.len());
    for row in rows {
        let (Some(posting_id), Some(entry_id), Some(currency), Some(amount_minor), Some(kind), Some(created_us)) =
            (row.posting_id, row.entry_id, row.currency, row.amount_minor, row.kind, row.created_us)
        else {
            continue; // the empty page's one row
        };
        balance = balance.checked_add(amount_minor).ok_or(LedgerError::BalanceOverflow(account))?;
        lines.push(HistoryLine {
            posting_id: PostingId(posting_id),
            entry_id: EntryId::from_db(entry_id),
            created_at: from_unix_micros(created_us),
            kind: EntryKind::parse(&kind)
                .ok_or_else(|| LedgerError::Inconsistent(format!("unknown entry kind {kind:?}")))?,
            reference: row.reference,
            metadata: row.metadata.map(Metadata::from_stored).transpose()?,
            currency: Currency::from_code(&currency)?,
            amount_minor,
            balance_after_minor: balance,
        });
    }
    Ok(lines)
}

/// The statement [`balance_at`] runs for [`At::Entry`]: `$1` the account, `$2` the
/// entry id.
pub const BALANCE_AT_ENTRY_SQL: &str = "
    SELECT a.currency, (SELECT COALESCE(sum(p.amount_minor), 0) FROM postings p
                        WHERE p.account_id = $1 AND p.entry_id <= $2)::int8 AS balance_minor
    FROM accounts a WHERE a.id = $1";

/// The statement [`balance_at`] runs for [`At::Time`]: `$1` the account, `$2` the
/// moment in microseconds since the Unix epoch.
pub const BALANCE_AT_TIME_SQL: &str = "
    SELECT a.currency, (SELECT COALESCE(sum(p.amount_minor), 0) FROM postings p
                        WHERE p.account_id = $1
                          AND p.created_at <= timestamptz 'epoch' + $2 * interval '1 microsecond')::int8
                       AS balance_minor
    FROM accounts a WHERE a.id = $1";

#[derive(QueryableByName)]
struct BalanceRow {
    #[diesel(sql_type = Text)]
    currency: String,
    #[diesel(sql_type = BigInt)]
    balance_minor: i64,
}

/// `account`'s balance at `at`: the sum of its postings up to that point (zero before
/// its first). It reads the account's postings up to there (the `(account_id, id)`
/// index), so its cost grows with the account's history.
pub fn balance_at(conn: &mut PgConnection, account: AccountId, at: At) -> Result<BalanceAt, LedgerError> {
    let (sql, point) = match at {
        At::Entry(entry) => (BALANCE_AT_ENTRY_SQL, entry.get()),
        At::Time(time) => (BALANCE_AT_TIME_SQL, unix_micros(time)?),
    };
    let rows: Vec<BalanceRow> = by_index(conn, |conn| {
        Ok(diesel::sql_query(sql).bind::<BigInt, _>(account.get()).bind::<BigInt, _>(point).load(conn)?)
    })?;
    let row = rows.into_iter().next();
    let row = row.ok_or(LedgerError::UnknownAccount(account))?;
    Ok(BalanceAt { account, currency: Currency::from_code(&row.currency)?, balance_minor: row.balance_minor })
}

/// Runs `read` under [`tx::with_batch_plans`]: probes by index whatever the statistics
/// say (right after a burst of postings they may still say the table is small).
fn by_index<T>(
    conn: &mut PgConnection,
    mut read: impl FnMut(&mut PgConnection) -> Result<T, LedgerError>,
) -> Result<T, LedgerError> {
    tx::transaction(conn, &TxOptions::default(), |tx| tx::with_batch_plans(tx, |tx| read(tx.conn())))
}

pub(crate) fn from_unix_micros(us: i64) -> SystemTime {
    let magnitude = Duration::from_micros(us.unsigned_abs());
    if us >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

fn unix_micros(time: SystemTime) -> Result<i64, InvalidInput> {
    let out_of_range = || InvalidInput::BadField { field: "at", reason: "the time is out of range".into() };
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).map_err(|_| out_of_range()),
        Err(before) => i64::try_from(before.duration().as_micros()).map(|n| -n).map_err(|_| out_of_range()),
    }
}

/// `time` as RFC 3339 in UTC, to the microsecond: `2026-12-04T18:30:00.123456Z`.
pub fn format_rfc3339(time: SystemTime) -> String {
    let us = unix_micros(time).unwrap_or(0);
    let (secs, micros) = (us.div_euclid(1_000_000), us.rem_euclid(1_000_000));
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z", rest / 3_600, rest % 3_600 / 60, rest % 60)
}

/// Parses RFC 3339: `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)` (a space or a
/// lower-case `t` for the `T`, `z` for `Z`; at most microseconds are kept).
pub fn parse_rfc3339(text: &str) -> Result<SystemTime, InvalidInput> {
    let bad = || InvalidInput::BadField {
        field: "at",
        reason: format!("{text:?} is not an RFC 3339 time such as 2026-12-04T18:30:00Z"),
    };
    let b = text.as_bytes();
    let num = |from: usize, len: usize| -> Result<i64, InvalidInput> {
        let digits = b.get(from..from + len).ok_or_else(bad)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        Ok(digits.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let sep = |at: usize, want: &[u8]| if b.get(at).is_some_and(|c| want.contains(c)) { Ok(()) } else { Err(bad()) };
    let (y, mo, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    sep(4, b"-")?;
    sep(7, b"-")?;
    sep(10, b"Tt ")?;
    let (h, mi, s) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    sep(13, b":")?;
    sep(16, b":")?;
    let mut i = 19;
    let mut micros = 0_i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 6 {
                micros = micros * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return Err(bad());
        }
        micros *= 10_i64.pow(6_u32.saturating_sub((i - start) as u32));
    }
    let offset_s = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() => {
            sep(i + 3, b":")?;
            let (oh, om) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if oh > 23 || om > 59 {
                return Err(bad());
            }
            (oh * 3_600 + om * 60) * if *sign == b'-' { -1 } else { 1 }
        }
        _ => return Err(bad()),
    };
    let days_in_month = match mo {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    if d < 1 || d > days_in_month || h > 23 || mi > 59 || s > 60 {
        return Err(bad());
    }
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3_600 + mi * 60 + s - offset_s;
    Ok(from_unix_micros(secs * 1_000_000 + micros))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (the inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_refuses_what_it_cannot_read() {
        let t = parse_rfc3339("2026-12-04T18:30:00.123456Z").unwrap();
        assert_eq!(format_rfc3339(t), "2026-12-04T18:30:00.123456Z");
        assert_eq!(parse_rfc3339("2026-12-04T20:30:00.123456+02:00").unwrap(), t);
        assert_eq!(parse_rfc3339("2026-12-04 18:30:00.1234567z").unwrap(), t);
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z").unwrap(), UNIX_EPOCH);
        assert_eq!(
            format_rfc3339(parse_rfc3339("2024-02-29T23:59:59.5-00:30").unwrap()),
            "2024-03-01T00:29:59.500000Z"
        );
        assert_eq!(format_rfc3339(parse_rfc3339("1969-12-31T23:59:59Z").unwrap()), "1969-12-31T23:59:59.000000Z");
        for bad in [
            "",
            "2026-12-04",
            "2026-12-04T18:30:00",
            "2026-02-30T00:00:00Z",
            "2026-12-04T24:00:00Z",
            "2026-12-04T18:30:00.Z",
            "2026-12-04T18:30:00+0200",
            "x026-12-04T18:30:00Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn posting_ids_are_positive() {
        assert!(PostingId::new(0).is_err());
        assert_eq!(PostingId::new(7).unwrap().get(), 7);
    }
}
