//! Hand-written statements that each connection keeps prepared.
//!
//! `diesel::sql_query` is never cached: the server parses and plans it on every call.
//! For the batch statements (`write_plan.sql`, `settle.sql`) planning cost as much as
//! running them on small batches (0.5 ms of 1.5 ms per call, measured with
//! `bench --profile` at 1,000 withdrawals/s), and the daemon runs hundreds per second.
//!
//! A [`Prepared`] statement is named by a type ([`StaticSql`]) that owns its one SQL
//! text, so Diesel's statement cache (keyed by that type) can never hand one statement's
//! plan to another. Inside [`crate::tx::with_batch_plans`] the server reuses one generic
//! plan (`plan_cache_mode = force_generic_plan`): the batch settings make every plan a
//! probe by id whatever the array sizes, so nothing is lost by not re-planning.

use std::marker::PhantomData;

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::query_dsl::RunQueryDsl;
use diesel::serialize::ToSql;
use diesel::sql_types::{HasSqlType, Untyped};
use diesel::QueryResult;

/// A statement's one SQL text, owned by a type so it can key the statement cache.
///
/// The SQL uses `$1`, `$2`, ... for its parameters, in `--` comments too if it likes:
/// comments are dropped before the statement is sent.
pub trait StaticSql: 'static {
    const SQL: &'static str;
}

/// A statement kept prepared on its connection, with its parameters bound.
#[must_use = "a statement runs only when loaded or executed"]
pub struct Prepared<'a, S: StaticSql> {
    binds: Vec<Box<dyn QueryFragment<Pg> + Send + 'a>>,
    statement: PhantomData<S>,
}

impl<'a, S: StaticSql> Prepared<'a, S> {
    pub fn new() -> Self {
        Prepared { binds: Vec::new(), statement: PhantomData }
    }

    /// Binds the next parameter (`$1` first).
    pub fn bind<ST, U>(mut self, value: U) -> Self
    where
        ST: Send + 'static,
        Pg: HasSqlType<ST>,
        U: ToSql<ST, Pg> + Send + 'a,
    {
        self.binds.push(Box::new(Bind::<ST, U> { value, sql_type: PhantomData }));
        self
    }
}

impl<S: StaticSql> Default for Prepared<'_, S> {
    fn default() -> Self {
        Self::new()
    }
}

struct Bind<ST, U> {
    value: U,
    sql_type: PhantomData<ST>,
}

impl<ST, U> QueryFragment<Pg> for Bind<ST, U>
where
    Pg: HasSqlType<ST>,
    U: ToSql<ST, Pg>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_bind_param::<ST, U>(&self.value)
    }
}

impl<S: StaticSql> QueryId for Prepared<'_, S> {
    type QueryId = S;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<S: StaticSql> Query for Prepared<'_, S> {
    type SqlType = Untyped;
}

impl<S: StaticSql, C> RunQueryDsl<C> for Prepared<'_, S> {}

impl<S: StaticSql> QueryFragment<Pg> for Prepared<'_, S> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        debug_assert!(quotes_are_plain(S::SQL), "a quoted `$` or `--` in a prepared statement:\n{}", S::SQL);
        debug_assert!(
            (1..=self.binds.len()).all(|n| pieces(S::SQL).contains(&Piece::Param(n))),
            "{} value(s) bound, but not every one is used by:\n{}",
            self.binds.len(),
            S::SQL
        );
        // Diesel numbers placeholders as they are pushed, so each `$n` of the text
        // becomes the n-th bind pushed again (a parameter used twice is sent twice).
        for piece in pieces(S::SQL) {
            match piece {
                Piece::Sql(text) => out.push_sql(text),
                Piece::Param(n) => match self.binds.get(n.wrapping_sub(1)) {
                    Some(bind) => bind.walk_ast(out.reborrow())?,
                    None => {
                        return Err(diesel::result::Error::QueryBuilderError(
                            format!("statement parameter ${n} is not bound ({} bound)", self.binds.len()).into(),
                        ))
                    }
                },
            }
        }
        Ok(())
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Piece<'s> {
    Sql(&'s str),
    Param(usize),
}

/// Splits SQL into text and `$n` parameters, dropping `--` comments (to the end of the
/// line). The statements here have no string literals or dollar quotes holding `$` or
/// `--`; a test checks every one of them.
fn pieces(sql: &str) -> Vec<Piece<'_>> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        if bytes[i] == b'-' && bytes.get(i + 1) == Some(&b'-') {
            if start < i {
                out.push(Piece::Sql(&sql[start..i]));
            }
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
            start = i;
        } else if bytes[i] == b'$' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
            if start < i {
                out.push(Piece::Sql(&sql[start..i]));
            }
            let digits = bytes[i + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
            out.push(Piece::Param(sql[i + 1..i + 1 + digits].parse().expect("digits")));
            i += 1 + digits;
            start = i;
        } else {
            i += 1;
        }
    }
    if start < bytes.len() {
        out.push(Piece::Sql(&sql[start..]));
    }
    out
}

/// Whether `sql` is safe for [`pieces`]: no quoted text holds `$` or `--`, and no
/// dollar quotes. Comments may say anything (an apostrophe in a comment is not a quote).
fn quotes_are_plain(sql: &str) -> bool {
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1)) {
            (b'-', Some(b'-')) => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            (b'\'', _) => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'\'' {
                    if bytes[i] == b'$' || (bytes[i] == b'-' && bytes.get(i + 1) == Some(&b'-')) {
                        return false;
                    }
                    i += 1;
                }
                i += 1;
            }
            (b'$', Some(b)) if !b.is_ascii_digit() => return false,
            _ => i += 1,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_and_comments() {
        let sql = "-- $9 in a comment\nSELECT $1::bigint, $12 -- tail $3\n, $1";
        assert_eq!(
            pieces(sql),
            vec![
                Piece::Sql("\nSELECT "),
                Piece::Param(1),
                Piece::Sql("::bigint, "),
                Piece::Param(12),
                Piece::Sql(" "),
                Piece::Sql("\n, "),
                Piece::Param(1),
            ]
        );
        assert_eq!(pieces("SELECT 1"), vec![Piece::Sql("SELECT 1")]);
        assert_eq!(pieces("SELECT '$' || 2"), vec![Piece::Sql("SELECT '$' || 2")]);
    }

    #[test]
    fn the_batch_statements_are_plain() {
        // Every statement is also checked each time it runs in a debug build.
        for sql in [crate::withdrawals::WritePlan::SQL, crate::payouts::SettleAll::SQL] {
            assert!(quotes_are_plain(sql), "a quoted `$` or `--` in:\n{sql}");
            assert!(pieces(sql).iter().any(|p| matches!(p, Piece::Param(_))), "no parameters in:\n{sql}");
        }
        assert!(quotes_are_plain("SELECT 'pending' -- a comment's $1 and 'quote\n, $2"));
        assert!(!quotes_are_plain("SELECT '--x'"));
        assert!(!quotes_are_plain("SELECT '$1'"));
        assert!(!quotes_are_plain("SELECT $$x$$"));
    }
}
